"""The demo's results against the generator's ground truth.

Identity quality is pairwise, as record linkage is usually judged: over every pair of
identifiers of the generated data, a pair is *predicted* linked when identity resolves both to
one profile and *truly* linked when one person owns both. Precision is the share of predicted
pairs that are true; recall the share of true pairs that are predicted. Pairs are counted per
group (sum of n(n-1)/2 over groups), never enumerated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc
from sklearn.metrics import roc_auc_score, roc_curve

from profilemesh.activation.v1 import activation_service_pb2 as activation_pb2
from profilemesh.common.v1 import identifier_pb2
from profilemesh.identity.v1 import identity_service_pb2
from profilemesh.scoring.v1 import scoring_service_pb2 as scoring_pb2
from profilemesh.services.demo.results import IdentityResult

RESOLVE_CHUNK = 1_000
JUDGED_TYPES = ("user_id", "email", "phone", "anonymous_id", "crm_id")
"""Identifier types pairs are judged on. Device ids are left out: a family tablet's id truly
belongs to several people, so it has no single owner to agree with."""


@dataclass(frozen=True)
class TruthView:
    """The ground truth as the evaluation reads it."""

    identifiers: list[tuple[str, str, str]]
    """(person, identifier type, value) for every identifier one person owns."""
    outcomes: dict[str, dict[str, bool]]
    """Model name -> person -> what the model predicts happened (churned, converted)."""


def truth_view(truth: Any) -> TruthView:
    identifiers = []
    for kind in JUDGED_TYPES:
        for value, owners in truth.owners(kind).items():
            if len(owners) == 1:
                identifiers.append((owners[0], kind, value))
    leads = truth.leads
    for person, lead_id in zip(
        leads.column("person_id").to_pylist(), leads.column("lead_id").to_pylist(), strict=True
    ):
        identifiers.append((person, "crm_id", f"leads:{lead_id}"))
    churn = truth.churn
    outcomes = {
        "churn": dict(
            zip(
                churn.column("person_id").to_pylist(),
                churn.column("churned").to_pylist(),
                strict=True,
            )
        ),
        "lead": dict(
            zip(
                leads.column("person_id").to_pylist(),
                leads.column("converted").to_pylist(),
                strict=True,
            )
        ),
    }
    return TruthView(identifiers, outcomes)


def _pairs(counts: Counter[Any]) -> int:
    return sum(n * (n - 1) // 2 for n in counts.values())


async def resolve_all(identity: Any, identifiers: Sequence[tuple[str, str]]) -> list[str | None]:
    """The profile id of each (type, value), None when identity does not know it."""
    found: list[str | None] = []
    for start in range(0, len(identifiers), RESOLVE_CHUNK):
        chunk = identifiers[start : start + RESOLVE_CHUNK]
        response = await identity.ResolveIdentifiers(
            identity_service_pb2.ResolveIdentifiersRequest(
                identifiers=[identifier_pb2.Identifier(type=t, value=v) for t, v in chunk]
            ),
            timeout=60,
        )
        found.extend(r.profile_id if r.found else None for r in response.resolutions)
    return found


async def identity_quality(identity: Any, truth: TruthView) -> IdentityResult:
    """Pairwise precision and recall of the profiles against who owns which identifier."""
    owned = truth.identifiers  # (person, type, value) rows
    profiles = await resolve_all(identity, [(t, v) for _, t, v in owned])
    known = [
        (person, profile)
        for (person, _, _), profile in zip(owned, profiles, strict=True)
        if profile
    ]
    true_pairs = _pairs(Counter(person for person, _ in known))
    predicted_pairs = _pairs(Counter(profile for _, profile in known))
    correct_pairs = _pairs(Counter(known))
    return IdentityResult(
        profiles=len({profile for _, profile in known}),
        people=len({person for person, _, _ in owned}),
        precision=correct_pairs / predicted_pairs if predicted_pairs else 1.0,
        recall=correct_pairs / true_pairs if true_pairs else 1.0,
    )


async def score_table(scoring: Any, model: str) -> pa.Table:
    """Every profile's score by the model's champion (ScoreBatch, Arrow)."""
    chunks = [
        pa.ipc.open_stream(chunk.arrow_ipc).read_all()
        async for chunk in scoring.ScoreBatch(scoring_pb2.ScoreBatchRequest(model=model))
    ]
    return pa.concat_tables(chunks)


async def truth_labels(
    identity: Any, truth: TruthView, model: str, profile_ids: Sequence[str]
) -> np.ndarray | None:
    """For each scored profile, the ground truth of what the model predicts (1/0), NaN when
    the profile is no generated person's; None for a model the truth says nothing about."""
    outcome = truth.outcomes.get(model)
    if outcome is None:
        return None
    keys = [(t, v) for _, t, v in truth.identifiers if t == "user_id"]
    people = [p for p, t, _ in truth.identifiers if t == "user_id"]
    profiles = await resolve_all(identity, keys)
    person_of = {
        profile: person for profile, person in zip(profiles, people, strict=True) if profile
    }
    return np.array(
        [
            float(outcome[person_of[p]]) if p in person_of and person_of[p] in outcome else np.nan
            for p in profile_ids
        ]
    )


def curves(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[float, tuple[list[float], list[float]], tuple[list[float], list[float]]]:
    """ROC-AUC, the ROC curve and the cumulative lift curve (share of targeted profiles ->
    lift over random), thinned to at most 200 points each."""
    auc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    step = max(1, len(fpr) // 200)
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(labels[order])
    targeted = np.arange(1, len(order) + 1)
    lift = (hits / targeted) / max(labels.mean(), 1e-12)
    points = np.unique(np.linspace(0, len(order) - 1, 100).astype(int))
    return (
        auc,
        (fpr[::step].tolist(), tpr[::step].tolist()),
        ((targeted[points] / len(order)).tolist(), lift[points].tolist()),
    )


async def trait_completeness(
    activation: Any, truth: TruthView, sample: int = 300
) -> dict[str, float]:
    """Share of a sample of profiles having each trait, read through GetUnifiedProfile."""
    emails = [(t, v) for _, t, v in truth.identifiers if t == "email"][:sample]
    counts: Counter[str] = Counter()
    seen = 0
    for kind, value in emails:
        try:
            profile = (
                await activation.GetUnifiedProfile(
                    activation_pb2.GetUnifiedProfileRequest(
                        identifier=identifier_pb2.Identifier(type=kind, value=value),
                        recent_events_limit=1,
                    )
                )
            ).profile
        except Exception:  # an email identity never linked: not a profile to judge
            continue
        seen += 1
        counts.update(profile.traits.keys())
    return {trait: count / seen for trait, count in counts.most_common()} if seen else {}
