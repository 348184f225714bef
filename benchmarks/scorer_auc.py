"""How well a learned scorer tells a cheap model's right answers from its wrong ones.

    python benchmarks/scorer_auc.py [--signals 0,0.6,1.0] [--world 16]

Out-of-fold AUC (5 folds, the training half of the simulated OVERRULING world, 1,080
queries) of ``batchroute.scorer`` for four cheap models, with the prompt's n-grams
crossed with the answer and without. ``--signals``: how strongly the prompts carry cue
words of the true label (``simulated_overruling._cued``; 0: not at all, the scorer can
only learn a model's leaning). Issue #16 measured 0.95 on the cheapest rung of real
OVERRULING answers; the simulated answers are the same at every signal level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from batchroute import scorer as sc
from batchroute.calibrate.scorers import _auc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_evaldata  # noqa: E402  (sibling scripts, not a package)
import simulated_overruling as sim  # noqa: E402

MODELS = ("gemini-1.5-flash-8b", "gemini-1.5-flash", "gpt-4o-mini", "gemma-2-9b")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--signals", default="0,0.6,1.0")
    ap.add_argument("--world", type=int, default=sim.WORLD)
    ap.add_argument("--data-dir")
    args = ap.parse_args(argv)
    root = convert_evaldata.data_dir(args.data_dir)
    print("| signal | features | " + " | ".join(MODELS) + " |")
    print("|---|---|" + "---|" * len(MODELS))
    for signal in (float(s) for s in args.signals.split(",")):
        records, _, _ = sim.records(root, seed=args.world, signal=signal)
        train = records[: len(records) // 2]
        prompts = [sc.prompt_text({"messages": r.messages}) for r in train]
        stop = sc.stop_grams(prompts)
        for cross in (False, True):
            cells = []
            for m in MODELS:
                rows = [sc.features(p, r.responses[m].samples[0].content, stop=stop,
                                    cross=cross) for p, r in zip(prompts, train, strict=True)]
                labels = [r.responses[m].samples[0].correct for r in train]
                cells.append(f"{_auc(sc.out_of_fold(rows, labels, 5), labels):.3f}")
            print(f"| {signal:g} | {'crossed' if cross else 'separate'} | "
                  + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
