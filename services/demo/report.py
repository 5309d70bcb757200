"""The demo's report: one HTML file, rendered on the server from ``DemoResults``.

The page is opened from a CI artifact, an e-mail or a laptop on a train, so it must not depend
on anything but itself: the CSS is inline, every plot is a PNG drawn here by matplotlib and
embedded as a ``data:`` URI, and there is no script at all. A Content-Security-Policy in the page
makes the browser refuse anything else, so a stray external reference shows up as a broken
element instead of a silent network request.

Any part of a run may be missing (a stage failed, a model was not trained, a measurement was
skipped); each section then says so instead of showing zeros that look like results. Every
piece of text that came from the run is escaped: persona names and segment expressions are
written by people and may contain anything.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from html import escape
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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

NOT_MEASURED = "Not measured in this run."

# Small plots keep the file at a few hundred kilobytes: a PNG of 600x350 pixels is 15-40 kB.
FIGSIZE = (6.0, 3.5)
DPI = 100
TOP_FEATURES = 10
SCORE_BINS = 30

ACCENT = "#2563eb"
REFERENCE = "#9ca3af"
# Enough distinct lines for the segments of a demo; more segments reuse the colours.
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777")

# Delivery states in the order a reader follows a delivery through the outbox; states the
# activation service adds later come after these, alphabetically.
STATE_ORDER = (
    "delivered",
    "pending",
    "retrying",
    "dead lettered",
    "skipped no consent",
    "skipped frequency cap",
)

# Draws one kind of curve (ROC, lift) on prepared axes.
DrawCurve = Callable[[Axes, Curve], None]

_NUMERIC = ' class="num"'
_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--accent:#2563eb;--page:#f9fafb}
*{box-sizing:border-box}
body{margin:0;background:var(--page);color:var(--ink);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1260px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:26px;margin:0 0 4px}
h2{font-size:20px;margin:40px 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
h3{font-size:16px;margin:24px 0 8px}
h4{font-size:14px;margin:16px 0 4px;color:var(--muted)}
.subtitle{color:var(--muted);margin:0 0 12px}
nav a{margin-right:16px;color:var(--accent);text-decoration:none;white-space:nowrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px}
.card .label{color:var(--muted);font-size:13px}
.card .value{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}
.card .value.absent{font-size:14px;font-weight:400;font-style:italic;color:var(--muted)}
.card .detail{color:var(--muted);font-size:12px}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line);margin:8px 0 16px;
font-size:14px}
th,td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafafa}
tfoot td{font-weight:600}
code{font:13px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;
padding:1px 4px;border-radius:4px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
figure img{display:block;width:100%;max-width:600px;height:auto;margin:0 auto}
figcaption{font-size:13px;color:var(--muted);margin-top:4px}
.missing{color:var(--muted);font-style:italic}
.note{color:var(--muted);font-size:13px;max-width:80ch}
article{margin-bottom:32px}
footer{margin-top:48px;color:var(--muted);font-size:12px}
"""

# Only inline styles and embedded images may load: the page is complete by construction.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Html(str):
    """Markup that is already safe to insert: everything else is escaped where it is used."""


def render_report(results: DemoResults, path: Path) -> Path:
    """Write the report for ``results`` to ``path`` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(results), encoding="utf-8")
    return path


def report_html(results: DemoResults) -> str:
    """The whole report as one HTML document."""
    sections = (
        ("summary", "Summary", _summary(results)),
        ("identity", "Identity resolution", _identity(results.identity)),
        ("models", "Models", _models(results.models)),
        ("clusters", "Behavioural clusters", _clusters(results.clusters)),
        ("segments", "Segments", _segments(results)),
        ("latencies", "Pipeline latencies", _latencies(results.latencies)),
        ("data-quality", "Data quality", _data_quality(results)),
        ("stages", "Stage timings", _stages(results.stages)),
    )
    title = f"ProfileMesh demo report: {_count(results.customers)} customers, seed {results.seed}"
    nav = " ".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{escape(name)}</h2>\n{content}\n</section>'
        for anchor, name, content in sections
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>ProfileMesh demo report</h1>
<p class="subtitle">{_count(results.customers)} generated customers, seed {results.seed}.
Every figure was measured on the running services or against the generator's ground truth.</p>
<nav>{nav}</nav>
{body}
<footer>Rendered by <code>profilemesh demo</code>. Self-contained: no network access is needed
to view this page.</footer>
</main>
</body>
</html>
"""


# -- Sections -----------------------------------------------------------------------------------


def _summary(results: DemoResults) -> str:
    ingestion, identity = results.ingestion, results.identity
    churn = _churn_model(results.models)
    delivered = _delivery_totals(results.segments)
    cards = [
        _card("Customers", _count(results.customers), f"seed {results.seed}"),
        _card(
            "Events per second",
            _events_per_second(ingestion),
            _ingestion_detail(ingestion),
        ),
        _card(
            "Profiles vs people",
            f"{_count(identity.profiles)} / {_count(identity.people)}" if identity else None,
            "unified profiles / people in the ground truth",
        ),
        _card("Merge precision", _ratio(identity.precision) if identity else None),
        _card("Merge recall", _ratio(identity.recall) if identity else None),
        _card("Merge F1", _ratio(identity.f1) if identity else None),
        _card(
            "Churn ROC-AUC",
            _ratio(churn.roc_auc) if churn else None,
            _churn_detail(churn) if churn else "",
        ),
        _card(
            "Deliveries",
            _count(delivered[0]) if delivered else None,
            f"delivered of {_count(delivered[1])} recorded" if delivered else "",
        ),
        _card(
            "Run time",
            _duration(results.total_seconds) if results.stages else None,
            f"{len(results.stages)} stages",
        ),
    ]
    return f'<div class="cards">{"".join(cards)}</div>'


def _identity(identity: IdentityResult | None) -> str:
    if identity is None:
        return _missing()
    per_person = _number(identity.profiles / identity.people, 3) if identity.people else "-"
    rows = [
        ("Unified profiles", _count(identity.profiles)),
        ("People in the ground truth", _count(identity.people)),
        ("Profiles per person", per_person),
        ("Merge precision", _ratio(identity.precision)),
        ("Merge recall", _ratio(identity.recall)),
        ("Merge F1", _ratio(identity.f1)),
        ("Probabilistic merges", _count(identity.probabilistic_merges)),
    ]
    note = (
        "Measured on pairs of identifiers. Precision: of the pairs the identity graph put in one "
        "profile, the share that belong to one person. Recall: of the pairs that belong to one "
        "person, the share the graph put in one profile. More profiles than people points to "
        "people split across profiles; fewer, to different people merged into one."
    )
    return _table(("Measure", "Value"), rows, numeric=(1,)) + f'<p class="note">{note}</p>'


def _models(models: Sequence[ModelResult]) -> str:
    if not models:
        return _missing()
    return "\n".join(_model(model) for model in models)


def _model(model: ModelResult) -> str:
    heading = f"{model.name} ({model.kind}, version {model.version})"
    rows: list[tuple[str, str, str, str]] = [
        _versus("ROC-AUC", model.roc_auc, model.baseline_roc_auc),
        _versus("PR-AUC", model.pr_auc, model.baseline_pr_auc),
        _versus("Top-decile lift", model.top_decile_lift, None),
        _versus("Brier score (lower is better)", model.brier, None),
        _versus("ROC-AUC against the ground truth", model.truth_roc_auc, None),
    ]
    table = _table(
        ("Metric", "Model", f"Baseline: {model.baseline}", "Difference"), rows, numeric=(1, 2, 3)
    )
    plots = [
        _curve_figure(f"ROC curve of {model.name}", model.roc, _draw_roc),
        _curve_figure(f"Lift curve of {model.name}", model.lift, _draw_lift),
        _importances_figure(model),
        _scores_figure(model),
    ]
    note = (
        "Metrics on held-out rows the model never learnt from; the baseline is the simple rule "
        "the model has to beat."
    )
    return (
        f"<article>\n<h3>{escape(heading)}</h3>\n{table}"
        f'<p class="note">{note}</p>\n<div class="plots">{"".join(plots)}</div>\n</article>'
    )


def _clusters(clusters: Sequence[ClusterRow]) -> str:
    if not clusters:
        return _missing()
    total = sum(cluster.size for cluster in clusters)
    rows = [
        (
            str(cluster.cluster_id),
            cluster.persona,
            _count(cluster.size),
            _percent(cluster.size / total) if total else "-",
            cluster.description,
        )
        for cluster in clusters
    ]
    return _table(
        ("Cluster", "Persona", "Customers", "Share", "What sets it apart"), rows, numeric=(0, 2, 3)
    )


def _segments(results: DemoResults) -> str:
    segments = results.segments
    if not segments:
        return _missing()
    rows = [
        (segment.name, _Html(f"<code>{escape(segment.expression)}</code>"), _count(segment.members))
        for segment in segments
    ]
    parts = [_table(("Segment", "Expression", "Members"), rows, numeric=(2,))]
    parts.append("<h4>Sizes over time</h4>")
    parts.append(f'<div class="plots">{_sizes_figure(segments)}</div>')
    parts.append("<h4>Deliveries per destination</h4>")
    parts.append(_deliveries(segments))
    checks = []
    if results.webhook_received:
        checks.append(f"the webhook receiver got {_count(results.webhook_received)} requests")
    if results.export_rows:
        checks.append(f"the audience export holds {_count(results.export_rows)} rows")
    if checks:
        parts.append(f'<p class="note">At the destinations, {" and ".join(checks)}.</p>')
    return "\n".join(parts)


def _deliveries(segments: Sequence[SegmentResult]) -> str:
    states = _ordered_states(
        {
            state
            for segment in segments
            for by_state in segment.deliveries.values()
            for state in by_state
        }
    )
    if not states:
        return _missing()
    rows = []
    for segment in segments:
        for destination, by_state in sorted(segment.deliveries.items()):
            counts = [_count(by_state.get(state, 0)) for state in states]
            rows.append((segment.name, destination, *counts, _count(sum(by_state.values()))))
    headers = ("Segment", "Destination", *(_state_heading(state) for state in states), "Total")
    return _table(headers, rows, numeric=tuple(range(2, len(headers))))


def _latencies(latencies: Sequence[Latency]) -> str:
    if not latencies:
        return _missing()
    rows = [
        (
            latency.name,
            _number(latency.p50_ms, 1),
            _number(latency.p99_ms, 1),
            _count(latency.samples),
        )
        for latency in latencies
    ]
    return _table(("Path", "p50 (ms)", "p99 (ms)", "Samples"), rows, numeric=(1, 2, 3))


def _data_quality(results: DemoResults) -> str:
    ingestion = results.ingestion
    parts = ["<h3>Rejected at ingestion</h3>"]
    parts.append(_reasons(ingestion, ingestion.rejected_by_reason if ingestion else {}, "rejected"))
    parts.append("<h3>Flagged at ingestion</h3>")
    parts.append(_reasons(ingestion, ingestion.flagged_by_reason if ingestion else {}, "flagged"))
    parts.append("<h3>Profile completeness per trait</h3>")
    if results.trait_completeness:
        parts.append(f'<div class="plots">{_completeness_figure(results.trait_completeness)}</div>')
    else:
        parts.append(_missing())
    return "\n".join(parts)


def _reasons(ingestion: IngestionResult | None, by_reason: Mapping[str, int], verb: str) -> str:
    """Counts per reason, as a share of everything imported: events and records both go through
    the same checks."""
    if ingestion is None:
        return _missing()
    if not by_reason:
        return f"<p>Nothing {escape(verb)}.</p>"
    imported = ingestion.events + ingestion.records

    def share(count: int) -> str:
        return _percent(count / imported) if imported else "-"

    ordered = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    rows = [(reason, _count(count), share(count)) for reason, count in ordered]
    total = sum(by_reason.values())
    footer = ("Total", _count(total), share(total))
    return _table(
        ("Reason", "Items", "Share of items imported"), rows, numeric=(1, 2), footer=footer
    )


def _stages(stages: Sequence[StageTiming]) -> str:
    if not stages:
        return _missing()
    total = sum(stage.seconds for stage in stages)
    rows = [
        (stage.name, _number(stage.seconds, 2), _percent(stage.seconds / total) if total else "-")
        for stage in stages
    ]
    footer = ("Total", _number(total, 2), _percent(1.0) if total else "-")
    return _table(("Stage", "Seconds", "Share"), rows, numeric=(1, 2), footer=footer)


# -- Plots --------------------------------------------------------------------------------------


@contextmanager
def _plot(figsize: tuple[float, float] = FIGSIZE) -> Iterator[tuple[Figure, Axes]]:
    """A figure on the Agg canvas with the report's style.

    Figures are made directly rather than through pyplot, which keeps every figure it ever made
    alive in a global registry; the Agg canvas is attached explicitly so that no GUI backend is
    ever looked for on a server.
    """
    with matplotlib.rc_context(
        {
            # Text in plots comes from the run: a `$` in a feature name must not start mathtext.
            "text.parse_math": False,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    ):
        figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        yield figure, figure.add_subplot()


def _figure(figure: Figure, caption: str) -> str:
    buffer = io.BytesIO()
    # No metadata: the same results render to the same bytes.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    text = escape(caption)
    return (
        f'<figure><img alt="{text}" src="data:image/png;base64,{data}">'
        f"<figcaption>{text}</figcaption></figure>"
    )


def _missing_figure(caption: str, reason: str = NOT_MEASURED) -> str:
    return (
        f"<figure><figcaption>{escape(caption)}</figcaption>"
        f'<p class="missing">{escape(reason)}</p></figure>'
    )


def _curve_problem(curve: Curve | None) -> str | None:
    """Why ``curve`` cannot be drawn, or ``None`` when it can."""
    if curve is None or not curve.x:
        return NOT_MEASURED
    if len(curve.x) != len(curve.y):
        return f"Not drawn: {len(curve.x)} x values but {len(curve.y)} y values."
    return None


def _curve_figure(caption: str, curve: Curve | None, draw: DrawCurve) -> str:
    problem = _curve_problem(curve)
    if curve is None or problem is not None:
        return _missing_figure(caption, problem or NOT_MEASURED)
    with _plot() as (figure, axes):
        draw(axes, curve)
        return _figure(figure, caption)


def _draw_roc(axes: Axes, curve: Curve) -> None:
    axes.plot([0, 1], [0, 1], linestyle="--", color=REFERENCE, label="chance")
    axes.plot(curve.x, curve.y, color=ACCENT, label="model")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    axes.legend(loc="lower right", frameon=False)


def _draw_lift(axes: Axes, curve: Curve) -> None:
    axes.axhline(1.0, linestyle="--", color=REFERENCE, label="random targeting")
    axes.plot(curve.x, curve.y, color=ACCENT, marker="o", markersize=3, label="model")
    axes.set(xlabel="share of customers targeted, highest scores first", ylabel="lift")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper right", frameon=False)


def _importances_figure(model: ModelResult) -> str:
    caption = f"Top features of {model.name}"
    if not model.importances:
        return _missing_figure(caption)
    top = sorted(model.importances, key=lambda item: item[1], reverse=True)[:TOP_FEATURES]
    top.reverse()  # barh draws upwards: the most important feature ends on top
    with _plot() as (figure, axes):
        axes.barh([name for name, _ in top], [value for _, value in top], color=ACCENT)
        axes.set(xlabel="importance")
        axes.grid(axis="y", visible=False)
        axes.tick_params(axis="y", labelsize=8)
        return _figure(figure, caption)


def _scores_figure(model: ModelResult) -> str:
    caption = f"Score distribution of {model.name}"
    scores = [score for score in model.scores if math.isfinite(score)]
    if not scores:
        return _missing_figure(caption)
    # Probabilities share the [0, 1] axis so that two models' histograms compare at a glance.
    probabilities = all(0.0 <= score <= 1.0 for score in scores)
    with _plot() as (figure, axes):
        axes.hist(
            scores,
            bins=SCORE_BINS,
            range=(0.0, 1.0) if probabilities else None,
            color=ACCENT,
            edgecolor="white",
            linewidth=0.5,
        )
        axes.set(xlabel="score", ylabel="customers")
        return _figure(figure, f"{caption} ({_count(len(scores))} customers)")


def _sizes_figure(segments: Sequence[SegmentResult]) -> str:
    caption = "Segment members over time"
    drawable = [
        (segment.name, curve)
        for segment in segments
        if (curve := segment.sizes_over_time) is not None and _curve_problem(curve) is None
    ]
    if not drawable:
        return _missing_figure(caption)
    with _plot() as (figure, axes):
        for index, (name, curve) in enumerate(drawable):
            axes.plot(curve.x, curve.y, color=PALETTE[index % len(PALETTE)], label=name)
        axes.set(xlabel="time", ylabel="members")
        axes.set_ylim(bottom=0)
        axes.legend(loc="best", frameon=False, fontsize=8)
        return _figure(figure, caption)


def _completeness_figure(completeness: Mapping[str, float]) -> str:
    ordered = sorted(completeness.items(), key=lambda item: (item[1], item[0]))
    height = max(FIGSIZE[1], 0.28 * len(ordered) + 1.0)
    with _plot((FIGSIZE[0], height)) as (figure, axes):
        bars = axes.barh(
            [name for name, _ in ordered], [share for _, share in ordered], color=ACCENT
        )
        axes.bar_label(bars, labels=[f"{share:.0%}" for _, share in ordered], padding=3, fontsize=8)
        axes.set(xlim=(0, 1.12), xlabel="share of profiles with the trait")
        axes.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
        axes.grid(axis="y", visible=False)
        return _figure(figure, "Profile completeness per trait")


# -- Pieces -------------------------------------------------------------------------------------


def _missing() -> str:
    return f'<p class="missing">{NOT_MEASURED}</p>'


def _card(label: str, value: str | None, detail: str = "") -> str:
    """A headline figure; without a value its detail would describe nothing, so it is left out."""
    if value is None:
        shown = f'<div class="value absent">{NOT_MEASURED}</div>'
    else:
        shown = (
            f'<div class="value">{escape(value)}</div><div class="detail">{escape(detail)}</div>'
        )
    return f'<div class="card"><div class="label">{escape(label)}</div>{shown}</div>'


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    footer: Sequence[str] | None = None,
) -> str:
    """A table of text cells, escaped unless they are ``_Html``; ``numeric`` columns align right."""

    def cells(values: Sequence[str], tag: str) -> str:
        return "".join(
            f"<{tag}{_NUMERIC if index in numeric else ''}>{_cell(value)}</{tag}>"
            for index, value in enumerate(values)
        )

    head = f"<thead><tr>{cells(headers, 'th')}</tr></thead>"
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    foot = f"<tfoot><tr>{cells(footer, 'td')}</tr></tfoot>" if footer else ""
    return f"<table>{head}<tbody>{body}</tbody>{foot}</table>"


def _cell(value: str) -> str:
    return value if isinstance(value, _Html) else escape(value)


def _versus(label: str, model: float | None, baseline: float | None) -> tuple[str, str, str, str]:
    difference = _signed(model - baseline) if model is not None and baseline is not None else "-"
    return label, _ratio(model), _ratio(baseline) if baseline is not None else "-", difference


# -- Figures from the results -------------------------------------------------------------------


def _churn_model(models: Sequence[ModelResult]) -> ModelResult | None:
    """The churn model, found by kind (``churn`` or ``MODEL_KIND_CHURN``) or else by name."""
    for model in models:
        if "churn" in model.kind.lower():
            return model
    return next((model for model in models if "churn" in model.name.lower()), None)


def _churn_detail(model: ModelResult) -> str:
    parts = [f"baseline {_ratio(model.baseline_roc_auc)}"]
    if _measured(model.truth_roc_auc):
        parts.insert(0, f"{_ratio(model.truth_roc_auc)} against the ground truth")
    return "; ".join(parts)


def _delivery_totals(segments: Sequence[SegmentResult]) -> tuple[int, int] | None:
    """Deliveries that reached their destination and all deliveries recorded, or ``None``."""
    counts = [
        (state, count)
        for segment in segments
        for by_state in segment.deliveries.values()
        for state, count in by_state.items()
    ]
    if not counts:
        return None
    delivered = sum(count for state, count in counts if _state_label(state) == "delivered")
    return delivered, sum(count for _, count in counts)


def _events_per_second(ingestion: IngestionResult | None) -> str | None:
    """The ingestion rate; a run that timed nothing has no rate rather than a rate of zero."""
    if ingestion is None or ingestion.seconds <= 0:
        return None
    return f"{ingestion.events_per_second:,.0f}"


def _ingestion_detail(ingestion: IngestionResult | None) -> str:
    if ingestion is None:
        return ""
    return (
        f"{_count(ingestion.events)} events and {_count(ingestion.records)} records "
        f"in {_duration(ingestion.seconds)}"
    )


def _state_label(state: str) -> str:
    """``DELIVERY_STATE_DEAD_LETTERED`` and ``dead_lettered`` both read ``dead lettered``."""
    label = state.lower().removeprefix("delivery_state_")
    return label.replace("_", " ").strip()


def _state_heading(state: str) -> str:
    return _state_label(state).capitalize()


def _ordered_states(states: set[str]) -> list[str]:
    def position(state: str) -> tuple[int, str]:
        label = _state_label(state)
        known = STATE_ORDER.index(label) if label in STATE_ORDER else len(STATE_ORDER)
        return known, label

    return sorted(states, key=position)


# -- Formatting ---------------------------------------------------------------------------------


def _measured(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _count(value: int) -> str:
    return f"{value:,}"


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else "not measured"


def _ratio(value: float | None) -> str:
    """A score between 0 and 1 (or a lift) with three decimals; NaN or absent is not measured."""
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "not measured"


def _signed(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "-"


def _percent(value: float) -> str:
    """A share with one decimal; a share too small for that still reads as more than none."""
    if 0 < value < 0.0001:
        return "<0.01%"
    return f"{value:.2%}" if value < 0.01 else f"{value:.1%}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)} min {rest:.0f} s"
