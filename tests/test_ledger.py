"""Cost ledger and what people read from it: tag rollups, the estimate, the HTML report."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from batchroute.config import load_config
from batchroute.embedded import run_file
from batchroute.estimate import estimate_file
from batchroute.html_report import render_html
from batchroute.store import Store, get_engine

from .conftest import EXAMPLE


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Store, Path]:
    tmp = tmp_path_factory.mktemp("ledger")
    store = Store(get_engine(f"sqlite:///{tmp / 'l.db'}"))
    outcome = run_file(EXAMPLE, tmp / "o.jsonl", tmp / "e.jsonl", load_config(), store=store)
    return outcome.report, store, tmp


def test_tag_rollups_add_up(ran: tuple[dict[str, Any], Store, Path]) -> None:
    report, store, _ = ran
    teams = {k: v for k, v in report["by_tag"].items() if k.startswith("team=")}
    assert set(teams) == {"team=support", "team=finance", "team=ops", "team=eng"}
    # every example job has exactly one team: the team buckets partition the batch
    assert sum(v["jobs"] for v in teams.values()) == report["jobs"]
    assert sum(v["cost_usd"] for v in teams.values()) == pytest.approx(report["cost_usd"],
                                                                       abs=1e-7)
    assert sum(v["attempts"] for v in teams.values()) == report["attempts"]


def test_estimate_is_close_to_what_the_run_spent(ran: tuple[dict[str, Any], Store, Path],
                                                 tmp_path: Path) -> None:
    report, store, _ = ran
    cold = estimate_file(load_config(), EXAMPLE, Store(get_engine(f"sqlite:///{tmp_path}/c.db")))
    warm = estimate_file(load_config(), EXAMPLE, store)
    assert cold["jobs"] == warm["jobs"] == report["jobs"]
    assert warm["assumptions"]["answer_tokens"] == "history"
    # Stated tolerances (README): baseline within 10%, routed cost within 25%, cold or warm.
    for est in (cold, warm):
        assert est["baseline_cost_usd"] == pytest.approx(report["baseline_cost_usd"], rel=0.10)
        assert est["routed_cost_usd"]["expected"] == pytest.approx(report["cost_usd"], rel=0.25)
        assert est["routed_cost_usd"]["low"] <= report["cost_usd"] <= est["routed_cost_usd"]["high"]
    # The per-tier figures are "everything on that tier", ordered by price.
    tiers = [v["cost_usd"] for v in cold["per_tier"].values()]
    assert tiers == sorted(tiers)


def test_estimate_spends_and_stores_nothing(tmp_path: Path) -> None:
    store = Store(get_engine(f"sqlite:///{tmp_path}/n.db"))
    estimate_file(load_config(), EXAMPLE, store)
    with store.session() as s:
        from sqlmodel import select

        from batchroute.store import Attempt, Job
        assert not s.exec(select(Job)).all()
        assert not s.exec(select(Attempt)).all()


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_report_is_self_contained_with_charts(
        ran: tuple[dict[str, Any], Store, Path]) -> None:
    report, _, _ = ran
    html = render_html(report)
    p = _Collect()
    p.feed(html)
    assert not [t for t, a in p.tags if t in ("script", "link", "img", "iframe")]
    assert not [a for _, a in p.tags if any(str(v).startswith(("http:", "https:", "//"))
                                            for k, v in a.items() if k in ("src", "href"))]
    bars = [a for t, a in p.tags if t == "rect" and a.get("class") == "bar"]
    tier_bars = {a["data-label"] for a in bars} & {f"tier {k}" for k in report["by_tier"]}
    assert tier_bars == {f"tier {k}" for k in report["by_tier"]}
    assert f"{report['savings_pct']:.1f}%" in html


def test_html_report_renders_in_headless_chromium(ran: tuple[dict[str, Any], Store, Path],
                                                  tmp_path: Path) -> None:
    """What a person sees: Debian's Chromium renders the page, and the chart's bars show."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from PIL import Image

    report, _, _ = ran
    page, shot = tmp_path / "report.html", tmp_path / "report.png"
    page.write_text(render_html(report))
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,900",
                    f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20) or []
    counts = {rgb: n for n, rgb in colours}
    # The first bar colour (#2563eb) fills the "batchroute" bar and tier 1's bar.
    assert counts.get((0x25, 0x63, 0xEB), 0) > 2000
    assert counts.get((0x16, 0xA3, 0x4A), 0) > 2000  # the baseline bar
