"""Behavioural segments and lookalikes on customers drawn from planted groups: clustering finds
the groups and their number, tells each as a persona named after what sets it apart, assigns new
customers and survives JSON; lookalikes rank the hidden members of a seed audience first; bad
requests are refused with the offending field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.metrics import adjusted_rand_score, roc_auc_score, silhouette_score

from profilemesh.services.scoring.clustering import (
    ClusterModel,
    Persona,
    discover,
    persona_table,
)
from profilemesh.services.scoring.lookalikes import score_lookalikes
from profilemesh.shared.errors import InvalidArgument

Floats = npt.NDArray[np.float64]
Groups = npt.NDArray[np.int64]

FEATURES = (
    "orders_90d",
    "revenue_90d",
    "recency_days",
    "page_views_30d",
    "tenure_days",
    "emails_opened_30d",
    "noise_a",
    "noise_b",
)


# -- Planted customers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A kind of customer: its share of the base and the means of its behaviour."""

    name: str
    share: float
    orders: float
    recency: float
    page_views: float
    tenure: float
    emails: float


LOYAL = Group("loyal big spenders", 0.30, orders=8, recency=4, page_views=30, tenure=900, emails=6)
LAPSED = Group("lapsed", 0.30, orders=0.15, recency=120, page_views=3, tenure=700, emails=0.5)
WINDOW = Group(
    "window shoppers", 0.25, orders=0.1, recency=30, page_views=120, tenure=500, emails=4
)
NEW = Group("new", 0.15, orders=1.2, recency=4, page_views=25, tenure=15, emails=5)
GROUPS = (LOYAL, LAPSED, WINDOW, NEW)
# Loyal customers who also browse and read every email: the seed audience of the lookalikes.
ENGAGED = Group(
    "engaged big spenders", 0.06, orders=8, recency=4, page_views=150, tenure=900, emails=20
)


def customers(
    count: int, rng: np.random.Generator, groups: Sequence[Group] = GROUPS
) -> tuple[Floats, Groups]:
    """Customers drawn from the groups, with the skew of real behaviour: orders are Poisson
    around a gamma-distributed rate, a basket is lognormal around 60, durations and page views
    are gamma; two features are the same noise in every group. Returns the matrix (columns as
    FEATURES) and each customer's group."""
    shares = np.array([group.share for group in groups])
    group = rng.choice(len(groups), count, p=shares / shares.sum())

    def mean(attribute: str) -> Floats:
        return np.array([getattr(g, attribute) for g in groups], dtype=np.float64)[group]

    orders = rng.poisson(rng.gamma(4.0, mean("orders") / 4.0))
    revenue = orders * rng.lognormal(np.log(60.0), 0.4, count)
    matrix = np.column_stack(
        [
            orders,
            revenue,
            rng.gamma(2.0, mean("recency") / 2.0),
            rng.gamma(3.0, mean("page_views") / 3.0),
            rng.gamma(4.0, mean("tenure") / 4.0),
            rng.poisson(rng.gamma(2.0, mean("emails") / 2.0)),
            rng.gamma(2.0, 10.0, count),
            rng.lognormal(0.0, 1.0, count),
        ]
    ).astype(np.float64)
    return matrix, group.astype(np.int64)


@dataclass(frozen=True)
class Planted:
    matrix: Floats
    groups: Groups
    model: ClusterModel

    def cluster_of(self, group: Group) -> Persona:
        """The persona most of the group's customers were put in."""
        members = self.model.assign(self.matrix)[self.groups == GROUPS.index(group)]
        return self.model.personas[int(np.bincount(members).argmax())]


@pytest.fixture(scope="module")
def planted() -> Planted:
    matrix, groups = customers(20_000, np.random.default_rng(1))
    return Planted(matrix, groups, discover(matrix, FEATURES))


# -- Discovery --------------------------------------------------------------------------------


def test_discovery_finds_the_four_planted_groups(planted: Planted) -> None:
    # The groups overlap only where their tails meet (a lapsed customer who came back last
    # week, a window shopper who bought once): for seeds 0 to 5 of this generator the ARI is
    # 0.972 to 0.979, with about 1% of customers in another group's cluster. 0.9 leaves room
    # for several times as many before calling it a failure.
    assert planted.model.k == 4
    assert adjusted_rand_score(planted.groups, planted.model.assign(planted.matrix)) > 0.9
    assert len({planted.cluster_of(group).cluster_id for group in GROUPS}) == 4


def test_the_silhouette_is_sklearns_on_the_standardised_features() -> None:
    matrix, _ = customers(3_000, np.random.default_rng(2))
    model = discover(matrix, FEATURES)
    expected = silhouette_score(model.transform.apply(matrix), model.assign(matrix))
    assert model.silhouette == pytest.approx(expected, abs=1e-5)


def test_clusters_are_numbered_by_size_and_account_for_every_profile(planted: Planted) -> None:
    model = planted.model
    labels = model.assign(planted.matrix)
    sizes = [persona.size for persona in model.personas]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes == list(np.bincount(labels, minlength=model.k))
    assert sum(persona.share for persona in model.personas) == pytest.approx(1.0)
    assert model.profile_count == len(planted.matrix)
    for persona in model.personas:
        members = planted.matrix[labels == persona.cluster_id]
        np.testing.assert_allclose(persona.medians, np.median(members, axis=0))


def test_skewed_non_negative_features_are_clustered_on_their_logarithm(planted: Planted) -> None:
    log = dict(zip(FEATURES, planted.model.transform.log, strict=True))
    assert log["revenue_90d"] and log["orders_90d"] and log["noise_b"]
    symmetric = np.random.default_rng(3).normal(50.0, 5.0, (500, 2))
    assert discover(symmetric, ["a", "b"], k=2).transform.log == (False, False)


def test_a_whale_does_not_get_a_cluster_of_their_own() -> None:
    matrix, _ = customers(5_000, np.random.default_rng(4))
    matrix[0, :2] = [900, 2_000_000]  # 900 orders for two million in 90 days
    model = discover(matrix, FEATURES, k=4)
    assert min(persona.size for persona in model.personas) > 100


# -- Personas ---------------------------------------------------------------------------------


def top(persona: Persona, count: int) -> dict[str, float]:
    return dict(persona.distinguishing[:count])


def test_each_persona_is_told_by_the_features_planted_in_its_group(planted: Planted) -> None:
    loyal = planted.cluster_of(LOYAL)
    assert set(top(loyal, 2)) == {"orders_90d", "revenue_90d"}
    assert all(difference > 1 for difference in top(loyal, 2).values())
    assert loyal.label.endswith("big spenders") and "recent" in loyal.label.lower()

    lapsed = planted.cluster_of(LAPSED)
    assert top(lapsed, 2).get("recency_days", 0) > 1
    assert "lapsed" in lapsed.label.lower()

    window = planted.cluster_of(WINDOW)
    assert window.distinguishing[0][0] == "page_views_30d" and window.distinguishing[0][1] > 1
    assert "engaged" in window.label and "non-buying" in window.label

    new = planted.cluster_of(NEW)
    assert new.distinguishing[0][0] == "tenure_days" and new.distinguishing[0][1] < -1
    assert new.label.startswith("New")
    assert new.description.startswith("tenure_days 13.")


def test_noise_never_sets_a_persona_apart(planted: Planted) -> None:
    for persona in planted.model.personas:
        noise = {name: d for name, d in persona.distinguishing if name.startswith("noise")}
        assert all(abs(difference) < 0.2 for difference in noise.values())
        assert "noise" not in persona.label and "noise" not in persona.description


def test_features_outside_the_vocabulary_are_named_as_they_are() -> None:
    matrix, _ = customers(5_000, np.random.default_rng(5))
    names = [f"feature_{index}" for index in range(len(FEATURES))]
    model = discover(matrix, names, k=4)
    for persona in model.personas:
        name, difference = persona.distinguishing[0]
        assert persona.label.startswith(f"{'High' if difference > 0 else 'Low'} {name}")


def test_the_persona_table_shows_sizes_medians_and_what_is_high_or_low(planted: Planted) -> None:
    table = persona_table(planted.model)
    lines = table.splitlines()
    assert lines[0] == "4 clusters of 20,000 profiles (k-means, silhouette 0.35)"
    header = next(line for line in lines if line.startswith("id"))
    assert all(name in header for name in ("size", "share", *FEATURES))
    for persona in planted.model.personas:
        row = next(line for line in lines if persona.label in line)
        assert f"{persona.size:,}" in row and f"{persona.share:.1%}" in row
    assert any(line.lstrip().startswith("all profiles") for line in lines)
    lapsed = planted.cluster_of(LAPSED)
    apart = lines[lines.index(next(line for line in lines if line.startswith("What"))) + 1 :]
    assert "high recency_days (+" in apart[lapsed.cluster_id]


# -- Assignment and storage -------------------------------------------------------------------


def test_new_customers_join_the_cluster_of_their_group(planted: Planted) -> None:
    matrix, groups = customers(4_000, np.random.default_rng(6))
    cluster = np.array([planted.cluster_of(group).cluster_id for group in GROUPS])
    expected = cluster[groups]
    assert np.mean(planted.model.assign(matrix) == expected) > 0.97


def test_a_missing_value_counts_as_the_base_median(planted: Planted) -> None:
    matrix = planted.matrix[:500].copy()
    matrix[:, 6] = np.nan
    matrix[:, 7] = np.inf
    filled = matrix.copy()
    filled[:, 6:] = planted.model.transform.medians[6:]
    np.testing.assert_array_equal(planted.model.assign(matrix), planted.model.assign(filled))


def test_discovery_tolerates_missing_values() -> None:
    matrix, groups = customers(10_000, np.random.default_rng(7))
    holes = np.random.default_rng(8).random(matrix.shape) < 0.05
    matrix[holes] = np.nan
    model = discover(matrix, FEATURES)
    assert model.k == 4
    assert adjusted_rand_score(groups, model.assign(matrix)) > 0.85


def test_a_model_survives_json_exactly(planted: Planted) -> None:
    text = json.dumps(planted.model.to_json(), allow_nan=False)
    restored = ClusterModel.from_json(json.loads(text))
    assert restored == planted.model
    np.testing.assert_array_equal(
        restored.assign(planted.matrix), planted.model.assign(planted.matrix)
    )


def test_an_empty_median_is_stored_as_null(planted: Planted) -> None:
    persona = replace(planted.model.personas[0], medians=(float("nan"),) * len(FEATURES))
    model = replace(planted.model, personas=(persona, *planted.model.personas[1:]))
    data = json.loads(json.dumps(model.to_json(), allow_nan=False))
    assert data["personas"][0]["medians"] == [None] * len(FEATURES)
    assert np.isnan(ClusterModel.from_json(data).personas[0].medians).all()


def test_large_data_is_fitted_on_a_sample_and_every_profile_assigned(planted: Planted) -> None:
    model = discover(planted.matrix, FEATURES, sample_size=3_000)
    assert model.k == 4
    assert sum(persona.size for persona in model.personas) == len(planted.matrix)
    assert adjusted_rand_score(planted.groups, model.assign(planted.matrix)) > 0.9


def test_a_constant_feature_is_harmless(planted: Planted) -> None:
    matrix = np.column_stack([planted.matrix[:5_000], np.full(5_000, 7.0)])
    model = discover(matrix, [*FEATURES, "constant"], k=4)
    assert model.transform.scale[-1] == 1.0
    assert all(dict(persona.distinguishing)["constant"] == 0 for persona in model.personas)
    assert all(persona.centroid[-1] == pytest.approx(7.0) for persona in model.personas)


# -- Gaussian mixtures ------------------------------------------------------------------------


def test_a_gaussian_mixture_finds_the_groups_and_survives_json(planted: Planted) -> None:
    model = discover(planted.matrix, FEATURES, k=4, method="gaussian_mixture")
    assert model.method == "gaussian_mixture" and model.bic is not None
    assert adjusted_rand_score(planted.groups, model.assign(planted.matrix)) > 0.9
    restored = ClusterModel.from_json(json.loads(json.dumps(model.to_json())))
    np.testing.assert_array_equal(restored.assign(planted.matrix), model.assign(planted.matrix))


def test_a_gaussian_mixture_chooses_the_number_of_components_by_bic() -> None:
    matrix, _ = customers(3_000, np.random.default_rng(9))
    chosen = discover(matrix, FEATURES, max_k=5, method="gaussian_mixture")
    fixed = {k: discover(matrix, FEATURES, k=k, method="gaussian_mixture") for k in range(2, 6)}
    bics = {k: model.bic for k, model in fixed.items()}
    assert chosen.bic == min(bic for bic in bics.values() if bic is not None)
    assert chosen.k == min(bics, key=lambda k: bics[k] or 0.0)


# -- Lookalikes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    matrix: Floats
    seed: npt.NDArray[np.bool_]
    held_out: npt.NDArray[np.bool_]
    """Engaged big spenders left out of the seed: the lookalikes to find."""


@pytest.fixture(scope="module")
def audience() -> Audience:
    rng = np.random.default_rng(10)
    matrix, groups = customers(10_000, rng, (*GROUPS, ENGAGED))
    engaged = np.flatnonzero(groups == len(GROUPS))
    seed = np.zeros(len(matrix), dtype=bool)
    seed[engaged[: len(engaged) * 2 // 3]] = True
    held_out = np.zeros(len(matrix), dtype=bool)
    held_out[engaged[len(engaged) * 2 // 3 :]] = True
    return Audience(matrix, seed, held_out)


def test_hidden_members_of_the_seed_audience_rank_first(audience: Audience) -> None:
    others = int((~audience.seed).sum())
    ranked = score_lookalikes(audience.matrix, audience.seed, top_n=others)
    assert ranked.seed_size == int(audience.seed.sum())
    assert sorted(ranked.indices) == list(np.flatnonzero(~audience.seed))
    hidden = audience.held_out[ranked.indices]
    assert roc_auc_score(hidden, ranked.similarity) > 0.9
    assert hidden[:100].mean() > 0.8
    assert np.median(ranked.similarity[hidden]) > 0.8  # scored like the seed itself
    assert np.median(ranked.similarity[~hidden]) < 0.2
    assert ranked.similarity[0] == 1.0


def test_lookalikes_are_the_top_n_most_similar_first(audience: Audience) -> None:
    ranked = score_lookalikes(audience.matrix, audience.seed, top_n=50)
    assert len(ranked.indices) == len(ranked.similarity) == 50
    assert not audience.seed[ranked.indices].any()
    assert np.all(np.diff(ranked.similarity) <= 0)
    assert ranked.similarity.min() >= 0 and ranked.similarity.max() <= 1


def test_lookalikes_are_deterministic_for_a_seed(audience: Audience) -> None:
    first = score_lookalikes(audience.matrix, audience.seed, top_n=200, seed=3)
    again = score_lookalikes(audience.matrix, audience.seed, top_n=200, seed=3)
    np.testing.assert_array_equal(first.indices, again.indices)
    np.testing.assert_array_equal(first.similarity, again.similarity)


def test_lookalikes_handle_tiny_seeds_missing_values_and_few_others(audience: Audience) -> None:
    matrix = audience.matrix.copy()
    matrix[::7, 3] = np.nan
    one_seed = np.zeros(len(matrix), dtype=bool)
    one_seed[np.flatnonzero(audience.seed)[0]] = True
    assert len(score_lookalikes(matrix, one_seed, top_n=10).indices) == 10
    all_but_one = np.ones(len(matrix), dtype=bool)
    all_but_one[5] = False
    alone = score_lookalikes(matrix, all_but_one)
    assert list(alone.indices) == [5] and 0 <= alone.similarity[0] <= 1


# -- Refusals ---------------------------------------------------------------------------------


def refused(field: str) -> pytest.RaisesExc[InvalidArgument]:
    return pytest.raises(InvalidArgument, check=lambda error: error.violations[0].field == field)


def test_clustering_needs_two_features() -> None:
    with refused("feature_names"):
        discover(np.ones((10, 1)), ["orders_90d"])


def test_clustering_needs_a_profile_per_cluster() -> None:
    with refused("k"):
        discover(np.random.default_rng(0).random((3, 2)), ["a", "b"], k=4)
    with refused("k"):
        discover(np.random.default_rng(0).random((2, 2)), ["a", "b"])


@pytest.mark.parametrize(
    ("settings", "field"),
    [({"k": 1}, "k"), ({"k": -2}, "k"), ({"max_k": 1}, "max_k"), ({"method": "dbscan"}, "method")],
)
def test_clustering_refuses_impossible_settings(settings: dict[str, Any], field: str) -> None:
    with refused(field):
        discover(np.random.default_rng(0).random((50, 2)), ["a", "b"], **settings)


def test_a_feature_without_any_value_is_named() -> None:
    matrix = np.random.default_rng(0).random((50, 3))
    matrix[:, 2] = np.nan
    with refused("feature_names[2]"):
        discover(matrix, ["a", "b", "c"])


def test_a_repeated_feature_is_named() -> None:
    with refused("feature_names[1]"):
        discover(np.random.default_rng(0).random((50, 2)), ["a", "a"])


def test_lookalikes_need_a_seed_that_leaves_someone_out() -> None:
    matrix = np.random.default_rng(0).random((50, 2))
    with refused("seed_profile_ids"):
        score_lookalikes(matrix, np.zeros(50, dtype=bool))
    with refused("seed_profile_ids"):
        score_lookalikes(matrix, np.ones(50, dtype=bool))
    with refused("top_n"):
        score_lookalikes(matrix, np.arange(50) < 5, top_n=0)
