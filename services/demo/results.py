"""What a demo run measured, as plain data: printed as the summary and rendered as the report.

Every figure here comes from the running services or from comparing their output with the
generator's ground truth; nothing is computed for show.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageTiming:
    """How long one step of the demo took."""

    name: str
    seconds: float


@dataclass
class IngestionResult:
    events: int
    records: int
    seconds: float
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    flagged_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class IdentityResult:
    """Profiles against the ground truth: pairs of identifiers put in one profile."""

    profiles: int
    people: int
    precision: float
    recall: float
    probabilistic_merges: int = 0

    @property
    def f1(self) -> float:
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0


@dataclass
class Curve:
    x: list[float]
    y: list[float]


@dataclass
class ModelResult:
    name: str
    kind: str
    version: str
    roc_auc: float
    pr_auc: float
    top_decile_lift: float
    brier: float
    baseline: str
    baseline_roc_auc: float
    baseline_pr_auc: float
    importances: list[tuple[str, float]] = field(default_factory=list)
    truth_roc_auc: float | None = None
    """ROC-AUC of today's scores against the generator's ground truth."""
    roc: Curve | None = None
    lift: Curve | None = None
    scores: list[float] = field(default_factory=list)


@dataclass
class ClusterRow:
    cluster_id: int
    persona: str
    size: int
    description: str


@dataclass
class SegmentResult:
    segment_id: str
    name: str
    expression: str
    members: int
    sizes_over_time: Curve | None = None
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)
    """Destination name -> delivery state -> count."""


@dataclass
class Latency:
    name: str
    p50_ms: float
    p99_ms: float
    samples: int


@dataclass
class DemoResults:
    customers: int
    seed: int
    stages: list[StageTiming] = field(default_factory=list)
    ingestion: IngestionResult | None = None
    identity: IdentityResult | None = None
    models: list[ModelResult] = field(default_factory=list)
    clusters: list[ClusterRow] = field(default_factory=list)
    segments: list[SegmentResult] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    trait_completeness: dict[str, float] = field(default_factory=dict)
    """Trait -> share of profiles that have it."""
    webhook_received: int = 0
    export_rows: int = 0

    @property
    def total_seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)
