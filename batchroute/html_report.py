"""`batchroute report BATCH --html PATH`: one self-contained HTML file people would rather
look at than read.

No scripts, fonts or images fetched from anywhere: inline CSS and SVG bar charts
only, so the file opens the same from an email attachment, an S3 bucket or an
air-gapped laptop.
"""

from __future__ import annotations

from html import escape
from typing import Any

BAR_COLOURS = ("#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777")


def _bars(title: str, items: list[tuple[str, float]], unit: str = "$",
          chart_id: str = "") -> str:
    """A horizontal bar chart as inline SVG; values labelled so it reads without hovering."""
    width, label_w, row_h = 640, 170, 28
    top = max((v for _, v in items), default=0.0) or 1.0
    height = row_h * len(items) + 10
    rows = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * row_h
        w = max(1.0, (width - label_w - 110) * value / top)
        colour = BAR_COLOURS[i % len(BAR_COLOURS)]
        shown = f"{unit}{value:,.4f}" if unit == "$" else f"{value:,.1f}{unit}"
        rows.append(
            f'<text x="{label_w - 8}" y="{y + 18}" text-anchor="end">{escape(label)}</text>'
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" '
            f'fill="{colour}" data-label="{escape(label)}" data-value="{value}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 18}">{shown}</text>')
    return (f'<figure><figcaption>{escape(title)}</figcaption>'
            f'<svg id="{chart_id}" role="img" aria-label="{escape(title)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}">{"".join(rows)}</svg></figure>')


def _table(title: str, buckets: dict[str, dict[str, Any]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("", "jobs", "succeeded", "attempts", "tokens",
                                              "cost", "cost / accepted"))
    body = []
    for name, b in buckets.items():
        per = b.get("cost_per_success_usd")
        body.append(
            f"<tr><td>{escape(name)}</td><td>{b['jobs']}</td><td>{b['succeeded']}</td>"
            f"<td>{b['attempts']}</td><td>{b['tokens']:,}</td><td>${b['cost_usd']:.4f}</td>"
            f"<td>{'-' if per is None else f'${per:.6f}'}</td></tr>")
    return f"<h2>{escape(title)}</h2><table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(report: dict[str, Any]) -> str:
    r = report
    savings = (f"{r['savings_pct']:.1f}% saved (${r['savings_usd']:.4f}) against every job on "
               "its reference model")
    cards = [("jobs", f"{r['jobs']:,}"), ("succeeded", f"{r['succeeded']:,}"),
             ("failed", f"{r['failed']:,}"), ("cost", f"${r['cost_usd']:.4f}"),
             ("baseline", f"${r['baseline_cost_usd']:.4f}"),
             ("savings", f"{r['savings_pct']:.1f}%"),
             ("escalation rate", f"{100 * r['escalation_rate']:.1f}%")]
    reuse = r.get("reuse") or {}
    if reuse.get("hits"):  # answers copied from identical requests (batchroute.reuse_run)
        cards.append(("reused answers", f"{reuse['hits']:,} (${reuse['saved_usd']:.4f} saved)"))
    charts = [
        _bars("Cost vs baseline", [("batchroute", r["cost_usd"]),
                                   ("all on reference model", r["baseline_cost_usd"])],
              chart_id="chart-savings"),
        _bars("Saving by source", [
            ("routing to cheaper tiers", (r.get("savings_by_source") or {}).get("routing_usd", 0)),
            ("provider batch discount",
             (r.get("savings_by_source") or {}).get("batch_discount_usd", 0)),
            ("answer reuse", (r.get("savings_by_source") or {}).get("reuse_usd", 0))],
              chart_id="chart-saving-sources"),
        _bars("Cost by tier", [(f"tier {k}", v["cost_usd"]) for k, v in r["by_tier"].items()],
              chart_id="chart-tier"),
        _bars("Cost by model", [(k, v["cost_usd"]) for k, v in r["by_model"].items()],
              chart_id="chart-model"),
    ]
    tables = [_table(t, r[k]) for t, k in (("By task", "by_task"), ("By tier", "by_tier"),
                                          ("By model", "by_model"),
                                          ("By provider", "by_provider"),
                                          ("By metadata tag", "by_tag")) if r.get(k)]
    card_html = "".join(f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div>'
                        "</div>" for k, v in cards)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>batchroute report — {escape(r['name'] or r['batch_id'])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem;
       color: #111827; }}
h1 {{ font-size: 1.5rem; margin-bottom: .2rem; }} .sub {{ color: #4b5563; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .6rem; margin: 1.2rem 0; }}
.card {{ border: 1px solid #e5e7eb; border-radius: .5rem; padding: .5rem .9rem; }}
.card .k {{ color: #6b7280; font-size: .8rem; }} .card .v {{ font-size: 1.3rem; }}
figure {{ margin: 1rem 0; }} figcaption {{ font-weight: 600; margin-bottom: .3rem; }}
svg text {{ font-size: 12px; fill: #111827; }}
table {{ border-collapse: collapse; margin-bottom: 1rem; }}
td, th {{ border-bottom: 1px solid #e5e7eb; padding: .25rem .7rem; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
</style></head><body>
<h1>Batch {escape(r['batch_id'])} — {escape(r['name'])}</h1>
<div class="sub">{escape(savings)}</div>
<div class="cards">{card_html}</div>
{''.join(charts)}
{''.join(tables)}
</body></html>
"""
