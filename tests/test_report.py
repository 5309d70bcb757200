"""The demo's report is one self-contained HTML file: every section present, plots embedded as
PNGs that decode, nothing loaded from elsewhere, text from the run escaped, missing parts said to
be missing, and a page that a real browser draws."""

from __future__ import annotations

import base64
import io
import math
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from profilemesh.services.demo.report import NOT_MEASURED, render_report
from profilemesh.services.demo.results import (
    ClusterRow,
    Curve,
    DemoResults,
    IdentityResult,
    IngestionResult,
    Latency,
    ModelResult,
    SegmentResult,
    StageTiming,
)
from tests.postgres_server import skip_or_fail

SECTIONS = (
    "Summary",
    "Identity resolution",
    "Models",
    "Behavioural clusters",
    "Segments",
    "Pipeline latencies",
    "Data quality",
    "Stage timings",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EMBEDDED_PNG = re.compile(r'src="data:image/png;base64,([^"]+)"')
PERSONA_WITH_MARKUP = "<script>alert('persona')</script> big spenders"
CHROMIUM_TIMEOUT_SECONDS = 60


# -- A run as the demo would measure it ----------------------------------------------------------


def _roc(power: float) -> Curve:
    """A concave ROC curve, better the smaller ``power`` is."""
    xs = [i / 50 for i in range(51)]
    return Curve(x=xs, y=[x**power for x in xs])


def _lift(top: float) -> Curve:
    shares = [i / 10 for i in range(1, 11)]
    return Curve(x=shares, y=[1 + (top - 1) * (1 - share) ** 1.5 / 0.9**1.5 for share in shares])


def _model(name: str, kind: str, rng: random.Random, power: float) -> ModelResult:
    return ModelResult(
        name=name,
        kind=kind,
        version="3",
        roc_auc=1 / (1 + power),
        pr_auc=0.41,
        top_decile_lift=3.2,
        brier=0.118,
        baseline="recency rule",
        baseline_roc_auc=0.66,
        baseline_pr_auc=0.27,
        # A `$` pair in a feature name would be mathtext, and this one does not parse as such.
        importances=[(f"feature_{i}_90d", 1 / (i + 1)) for i in range(14)]
        + [("spend_$_eur_x_$_30d", 0.3)],
        truth_roc_auc=0.79,
        roc=_roc(power),
        lift=_lift(3.2),
        scores=[rng.betavariate(2, 5) for _ in range(3_000)],
    )


def _segment(segment_id: str, name: str, expression: str, members: int) -> SegmentResult:
    hours = [float(hour) for hour in range(25)]
    return SegmentResult(
        segment_id=segment_id,
        name=name,
        expression=expression,
        members=members,
        sizes_over_time=Curve(x=hours, y=[members * (1 - math.exp(-h / 5)) for h in hours]),
        deliveries={
            "crm-webhook": {"DELIVERY_STATE_DELIVERED": members, "DELIVERY_STATE_RETRYING": 3},
            "audience-export": {
                "DELIVERY_STATE_DELIVERED": members - 12,
                "DELIVERY_STATE_SKIPPED_NO_CONSENT": 12,
            },
        },
    )


def realistic_results() -> DemoResults:
    """What a demo over 10,000 customers reports: every part measured."""
    rng = random.Random(7)
    return DemoResults(
        customers=10_000,
        seed=7,
        stages=[
            StageTiming("generate", 4.2),
            StageTiming("ingest", 21.7),
            StageTiming("resolve identities", 9.8),
            StageTiming("train models", 35.1),
            StageTiming("activate", 6.4),
        ],
        ingestion=IngestionResult(
            events=412_000,
            records=30_000,
            seconds=21.7,
            rejected_by_reason={"missing identifier": 118, "timestamp in the future": 9},
            flagged_by_reason={"unknown event type": 640, "late arrival": 77},
        ),
        identity=IdentityResult(
            profiles=10_214, people=10_000, precision=0.991, recall=0.962, probabilistic_merges=812
        ),
        models=[
            _model("churn", "MODEL_KIND_CHURN", rng, power=0.3),
            _model("propensity", "MODEL_KIND_PROPENSITY", rng, power=0.45),
        ],
        clusters=[
            ClusterRow(0, PERSONA_WITH_MARKUP, 3_120, "many orders, recent, high revenue"),
            ClusterRow(1, "Lapsed", 2_870, "no order for 120 days & few page views"),
            ClusterRow(2, "Window shoppers", 4_010, "many page views, few orders"),
        ],
        segments=[
            _segment("at-risk", "At risk", 'churn.score > 0.7 && country == "FR"', 1_240),
            _segment("vip", "VIP", "clv.predicted > 500", 610),
        ],
        latencies=[
            Latency("event to profile", 38.2, 190.5, 5_000),
            Latency("profile to segment", 12.9, 88.0, 5_000),
            Latency("segment to webhook", 21.4, 140.7, 1_240),
        ],
        trait_completeness={
            "email": 0.94,
            "phone": 0.61,
            "first_name": 0.88,
            "country": 0.99,
            "birth_date": 0.32,
            "city": 0.72,
        },
        webhook_received=1_240,
        export_rows=1_838,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The realistic run rendered once for the whole module: plotting is the slow part."""
    return render_report(realistic_results(), tmp_path_factory.mktemp("report") / "report.html")


# -- The file -----------------------------------------------------------------------------------


def test_report_has_every_section(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in text
    for model in ("churn", "propensity"):
        assert f"<h3>{model} (MODEL_KIND_" in text


def test_headline_shows_the_run_figures(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    summary = text[text.index('<section id="summary">') : text.index('<section id="identity">')]
    assert "10,000" in summary  # customers
    assert "18,986" in summary  # events per second: 412,000 in 21.7 s
    assert "10,214 / 10,000" in summary  # profiles vs people
    assert "0.991" in summary and "0.962" in summary  # precision, recall
    assert f"{2 * 0.991 * 0.962 / (0.991 + 0.962):.3f}" in summary  # F1
    assert f"{1 / 1.3:.3f}" in summary  # churn ROC-AUC
    assert "3,676" in summary  # delivered: 1,240 + 1,228 + 610 + 598
    assert NOT_MEASURED not in summary


def test_plots_are_embedded_pngs_that_decode(report: Path) -> None:
    payloads = EMBEDDED_PNG.findall(report.read_text(encoding="utf-8"))
    # Per model ROC, lift, features and scores; segment sizes; trait completeness.
    assert len(payloads) == 2 * 4 + 1 + 1
    for payload in payloads:
        data = base64.b64decode(payload, validate=True)
        assert data.startswith(PNG_SIGNATURE)
        pixels = image.imread(io.BytesIO(data), format="png")
        assert pixels.shape[1] == 600  # 6 inches at 100 dpi
        assert np.ptp(pixels) > 0  # something was drawn


def test_report_loads_nothing_from_elsewhere(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    for reference in ('src="http', "src='http", 'href="http', "href='http", "url(", "@import"):
        assert reference not in text
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()


def test_report_stays_a_few_hundred_kilobytes(report: Path) -> None:
    assert report.stat().st_size < 600_000


def test_text_from_the_run_is_escaped(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert PERSONA_WITH_MARKUP not in text
    assert "&lt;script&gt;alert(&#x27;persona&#x27;)&lt;/script&gt; big spenders" in text
    assert "churn.score &gt; 0.7 &amp;&amp; country == &quot;FR&quot;" in text
    assert "no order for 120 days &amp; few page views" in text


def test_a_run_that_measured_nothing_still_renders(tmp_path: Path) -> None:
    path = render_report(DemoResults(customers=500, seed=1), tmp_path / "empty.html")
    text = path.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in text
    assert not EMBEDDED_PNG.search(text)
    # Every section and every headline figure but the customer count says it was not measured.
    assert text.count(NOT_MEASURED) >= len(SECTIONS) + 7


def test_partly_measured_parts_say_what_is_missing(tmp_path: Path) -> None:
    model = ModelResult(
        name="lead",
        kind="MODEL_KIND_LEAD",
        version="1",
        roc_auc=0.71,
        pr_auc=0.2,
        top_decile_lift=math.nan,
        brier=0.2,
        baseline="source rule",
        baseline_roc_auc=0.6,
        baseline_pr_auc=0.1,
        roc=Curve(x=[0.0, 0.5, 1.0], y=[0.0, 0.8]),
    )
    results = DemoResults(
        customers=500,
        seed=1,
        ingestion=IngestionResult(events=0, records=0, seconds=0.0),
        models=[model],
        segments=[SegmentResult("s", "Empty", "true", 0)],
    )
    text = render_report(results, tmp_path / "partial.html").read_text(encoding="utf-8")
    assert "<h3>lead (MODEL_KIND_LEAD, version 1)</h3>" in text
    assert "Not drawn: 3 x values but 2 y values." in text
    assert "Nothing rejected." in text
    assert not EMBEDDED_PNG.search(text)


# -- In a browser -------------------------------------------------------------------------------


def test_headless_chromium_draws_the_page(report: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        skip_or_fail("Chromium is not installed: apt-get install chromium")
    screenshot = tmp_path / "report.png"
    # As root Chromium only runs without its sandbox; its own profile directory keeps it from
    # joining a browser the user may have open.
    completed = subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1280,2000",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert screenshot.is_file(), completed.stderr[-2000:]
    pixels = image.imread(screenshot, format="png")
    assert pixels.shape[:2] == (2000, 1280)
    # A blank page is one colour; text, cards and plots make hundreds.
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 100
