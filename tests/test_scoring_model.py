"""The scoring model core: trained on generated profiles whose labels follow a known logistic
rule in two features (the others are noise), it must find those two, beat a baseline that sees
only one of them, give probabilities that match observed rates, name the right reasons, survive
storage as text and JSON, learn only from cut-offs before the held-out ones, and refuse data it
cannot honestly train or measure on."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace

import lightgbm
import numpy as np
import numpy.typing as npt
import pytest

from profilemesh.services.scoring.calibration import calibration_from_json
from profilemesh.services.scoring.metrics import evaluate, top_decile_lift
from profilemesh.services.scoring.model import (
    Scorer,
    TrainedModel,
    TrainingSet,
    split_rows,
    train,
)
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument

Floats = npt.NDArray[np.float64]

NAMES = ("recency_days@1", "orders_90d@1", "noise_a@1", "noise_b@1", "noise_c@1")
RECENCY, ORDERS, NOISE_A = 0, 1, 2
SIGNAL = {NAMES[RECENCY], NAMES[ORDERS]}
DAY_NS = 86_400 * 10**9
FIRST_CUTOFF_NS = 1_700_000_000 * 10**9
CUTOFFS = 6
PROFILES = 3000
# With the weights below, about 15% of the profiles are positive.
INTERCEPT = -3.2


# -- Generated profiles ----------------------------------------------------------------------


@dataclass(frozen=True)
class Profiles:
    """Generated rows and each row's true probability of a positive label."""

    training: TrainingSet
    probability: Floats


def generate(
    *, cutoffs: int = CUTOFFS, profiles: int = PROFILES, seed: int = 0, first_cutoff: int = 0
) -> Profiles:
    """Rows whose label is 1 with probability logistic(-2 recency_z + 1.5 orders_z - 3.2);
    recency and order counts are those z-scores in days and orders, the noise features
    standard normal, one of them 5% missing. The baseline reads the order count only."""
    rng = np.random.default_rng(seed)
    rows = cutoffs * profiles
    z = rng.normal(size=(rows, len(NAMES)))
    probability = 1.0 / (1.0 + np.exp(-(-2.0 * z[:, RECENCY] + 1.5 * z[:, ORDERS] + INTERCEPT)))
    labels = (rng.random(rows) < probability).astype(np.int8)
    matrix = np.column_stack([30.0 + 20.0 * z[:, RECENCY], 3.0 + z[:, ORDERS], z[:, NOISE_A:]])
    matrix[rng.random(rows) < 0.05, NOISE_A + 1] = np.nan
    steps = np.arange(first_cutoff, first_cutoff + cutoffs, dtype=np.int64)
    times = np.repeat(FIRST_CUTOFF_NS + steps * 30 * DAY_NS, profiles)
    training = TrainingSet(NAMES, matrix, labels, times, baseline_columns=(ORDERS,))
    return Profiles(training, probability)


def with_labels(training: TrainingSet, labels: npt.NDArray[np.int8]) -> TrainingSet:
    return replace(training, labels=labels)


def last_cutoff_rows(training: TrainingSet) -> npt.NDArray[np.bool_]:
    return np.asarray(training.cutoffs == training.cutoffs.max())


@pytest.fixture(scope="module")
def profiles() -> Profiles:
    return generate()


@pytest.fixture(scope="module")
def model(profiles: Profiles) -> TrainedModel:
    return train(profiles.training)


@pytest.fixture(scope="module")
def later() -> Profiles:
    """Profiles from the same population at a later cut-off, never seen in training."""
    return generate(cutoffs=1, profiles=20_000, seed=1, first_cutoff=CUTOFFS)


# -- Quality ----------------------------------------------------------------------------------


def test_model_ranks_far_above_chance_and_above_a_one_feature_baseline(
    model: TrainedModel,
) -> None:
    assert model.metrics.roc_auc > 0.85
    assert model.metrics.roc_auc > model.baseline_metrics.roc_auc + 0.05
    assert model.metrics.pr_auc > 2 * model.metrics.positive_rate
    assert model.metrics.top_decile_lift > 3.0
    assert model.metrics.top_decile_lift > model.baseline_metrics.top_decile_lift
    assert model.baseline == "logistic_regression[orders_90d@1]"


def test_metrics_count_training_rows_and_half_the_held_out_cutoff(model: TrainedModel) -> None:
    assert model.metrics.training_rows == (CUTOFFS - 1) * PROFILES
    assert model.metrics.validation_rows == PROFILES // 2
    assert model.baseline_metrics.training_rows == model.metrics.training_rows
    assert model.baseline_metrics.validation_rows == model.metrics.validation_rows
    assert 0.10 < model.metrics.positive_rate < 0.20
    assert model.validation_cutoffs == (FIRST_CUTOFF_NS + (CUTOFFS - 1) * 30 * DAY_NS,)


def test_importances_put_the_signal_features_first(model: TrainedModel) -> None:
    features = [feature for feature, _ in model.importances]
    shares = [share for _, share in model.importances]
    assert set(features[:2]) == SIGNAL
    assert sum(shares[:2]) > 0.8
    assert sorted(features) == sorted(NAMES)
    assert shares == sorted(shares, reverse=True)
    assert sum(shares) == pytest.approx(1.0)


def test_reasons_name_the_signal_features_most_often(model: TrainedModel, later: Profiles) -> None:
    explanations = model.scorer().explain(later.training.matrix[:2000], top=2)
    first_reasons = Counter(reasons[0][0] for reasons in explanations.reasons)
    assert sum(first_reasons[name] for name in SIGNAL) / 2000 > 0.95
    assert all(len(reasons) == 2 for reasons in explanations.reasons)
    assert all(abs(first[1]) >= abs(second[1]) for first, second in explanations.reasons), (
        "reasons come largest first"
    )


def test_explanations_add_up_to_the_score(model: TrainedModel, later: Profiles) -> None:
    scorer = model.scorer()
    rows = later.training.matrix[:50]
    explanations = scorer.explain(rows, top=len(NAMES))
    raw = np.array([sum(c for _, c in reasons) for reasons in explanations.reasons])
    np.testing.assert_allclose(raw + explanations.base_value, scorer.raw_scores(rows), atol=1e-9)
    np.testing.assert_allclose(explanations.scores, scorer.score(rows), atol=1e-9)


def test_explain_gives_at_most_as_many_reasons_as_features(model: TrainedModel) -> None:
    row = np.full(len(NAMES), np.nan)
    assert len(model.scorer().explain(row, top=20).reasons[0]) == len(NAMES)
    assert model.scorer().explain(row, top=0).reasons == ((),)
    nothing = model.scorer().explain(np.empty((0, len(NAMES))), top=3)
    assert (len(nothing.scores), nothing.reasons) == (0, ())
    with pytest.raises(InvalidArgument) as error:
        model.scorer().explain(row, top=-1)
    assert error.value.violations[0].field == "top"


# -- Calibration ------------------------------------------------------------------------------


def test_calibrated_scores_match_observed_rates(model: TrainedModel, later: Profiles) -> None:
    labels = later.training.labels
    scores = model.scorer().score(later.training.matrix)
    assert scores.mean() == pytest.approx(labels.mean(), abs=0.015)
    # Within each fifth of the scores, the mean score is close to the share of positives.
    for part in np.array_split(np.argsort(scores), 5):
        assert scores[part].mean() == pytest.approx(labels[part].mean(), abs=0.06)


def test_calibrated_scores_beat_the_baseline_and_a_constant_on_brier(
    model: TrainedModel,
) -> None:
    rate = model.metrics.positive_rate
    assert model.metrics.brier < model.baseline_metrics.brier
    assert model.metrics.brier < rate * (1 - rate) - 0.03
    assert model.metrics.log_loss < model.baseline_metrics.log_loss


def test_small_validation_sets_are_calibrated_with_two_parameters(later: Profiles) -> None:
    # 500 tuning rows: about 75 positives, a standard error of 0.016 on their rate.
    small = train(generate(profiles=1000, seed=2).training)
    assert small.calibration["method"] == "platt"
    scores = small.scorer().score(later.training.matrix)
    assert scores.mean() == pytest.approx(later.training.labels.mean(), abs=0.04)
    assert small.metrics.roc_auc > 0.8


def test_large_validation_sets_are_calibrated_with_isotonic_regression(
    model: TrainedModel,
) -> None:
    assert model.calibration["method"] == "isotonic"
    assert model.calibration["x"] == sorted(model.calibration["x"])
    assert all(0 < y < 1 for y in model.calibration["y"])


# -- Storage ----------------------------------------------------------------------------------


def test_stored_text_and_json_give_the_scores_the_metrics_were_computed_from(
    model: TrainedModel, profiles: Profiles
) -> None:
    stored = json.loads(json.dumps({"booster": model.booster_text, "cal": model.calibration}))
    loaded = Scorer.load(NAMES, stored["booster"], stored["cal"])
    split = split_rows(profiles.training)
    rows = profiles.training.matrix[split.measure]
    scores = loaded.score(rows)
    np.testing.assert_array_equal(scores, model.scorer().score(rows))
    recomputed = evaluate(
        profiles.training.labels[split.measure], scores, training_rows=len(split.train)
    )
    assert recomputed == model.metrics


def test_one_row_scores_like_the_same_row_in_a_batch(model: TrainedModel, later: Profiles) -> None:
    scorer = model.scorer()
    batch = scorer.score(later.training.matrix[:100])
    one_by_one = np.concatenate([scorer.score(row) for row in later.training.matrix[:100]])
    np.testing.assert_array_equal(one_by_one, batch)


def test_params_are_recorded_with_overrides_and_the_rounds_early_stopping_chose(
    profiles: Profiles,
) -> None:
    # As they arrive through a protobuf Struct: every number a float.
    trained = train(profiles.training, params={"num_leaves": 7.0, "learning_rate": 0.1})
    assert trained.params["num_leaves"] == 7
    assert trained.params["learning_rate"] == 0.1
    assert trained.params["objective"] == "binary"
    assert trained.params["deterministic"] is True
    rounds = trained.params["num_boost_round"]
    assert 1 <= rounds < 1000
    assert lightgbm.Booster(model_str=trained.booster_text).num_trees() == rounds
    json.dumps(trained.params)


def test_params_lightgbm_refuses_are_reported_as_such(profiles: Profiles) -> None:
    with pytest.raises(InvalidArgument) as error:
        train(profiles.training, params={"objective": "no_such_objective"})
    assert error.value.violations[0].field == "params"


def test_training_twice_gives_the_same_model(model: TrainedModel, profiles: Profiles) -> None:
    assert train(profiles.training) == model


# -- Time-based validation --------------------------------------------------------------------


def test_rows_of_the_latest_cutoff_are_held_out_and_halved(profiles: Profiles) -> None:
    training = profiles.training
    split = split_rows(training, validation_cutoffs=2, seed=3)
    held_out = np.sort(np.unique(training.cutoffs))[-2:]
    assert split.validation_cutoffs == tuple(int(c) for c in held_out)
    assert training.cutoffs[split.train].max() < held_out.min()
    validation = np.flatnonzero(np.isin(training.cutoffs, held_out))
    assert np.array_equal(np.sort(np.concatenate([split.tune, split.measure])), validation)
    assert abs(len(split.tune) - len(split.measure)) <= 1
    # Stratified: each half has its share of positives.
    tune_rate = training.labels[split.tune].mean()
    assert tune_rate == pytest.approx(training.labels[split.measure].mean(), abs=0.002)


def test_two_held_out_positives_go_one_to_each_half() -> None:
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 1, 0, 1], dtype=np.int8)
    cutoffs = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2], dtype=np.int64)
    training = TrainingSet(("a@1",), np.zeros((10, 1)), labels, cutoffs)
    for seed in range(10):
        split = split_rows(training, validation_cutoffs=2, seed=seed)
        assert (labels[split.tune].sum(), labels[split.measure].sum()) == (1, 1)


def test_only_earlier_cutoffs_are_trained_on(profiles: Profiles) -> None:
    """In the held-out cut-off the labels follow a noise feature instead of the signal. Had
    those rows been trained on, the trees would hold more than the earlier rows, noise_a would
    carry gain, and the metric rows (which follow noise_a) would be ranked well."""
    training = profiles.training
    held_out = last_cutoff_rows(training)
    poisoned = training.labels.copy()
    noise = training.matrix[held_out, NOISE_A]
    poisoned[held_out] = (noise > np.quantile(noise, 0.85)).astype(np.int8)
    trained = train(with_labels(training, poisoned), params={"bagging_fraction": 1.0})

    root_counts = {
        tree["tree_structure"].get("internal_count")
        for tree in lightgbm.Booster(model_str=trained.booster_text).dump_model()["tree_info"]
    }
    assert root_counts == {(CUTOFFS - 1) * PROFILES}
    assert trained.metrics.training_rows == (CUTOFFS - 1) * PROFILES
    assert trained.metrics.roc_auc < 0.6
    assert dict(trained.importances)[NAMES[NOISE_A]] < 0.1


# -- Refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        (NAMES[:-1], "missing noise_c@1"),
        ((*NAMES, "age@1"), "unexpected age@1"),
        ((NAMES[1], NAMES[0], *NAMES[2:]), "position 0 is 'orders_90d@1'"),
        (("recency_days@2", *NAMES[1:]), "missing recency_days@1; unexpected recency_days@2"),
    ],
)
def test_features_of_another_schema_are_refused(
    model: TrainedModel, names: tuple[str, ...], complaint: str
) -> None:
    scorer = model.scorer()
    scorer.check_schema(NAMES)
    with pytest.raises(FailedPrecondition) as error:
        scorer.check_schema(names)
    assert complaint in error.value.message
    assert [v.field for v in error.value.violations] == ["feature_names"]


def test_rows_of_the_wrong_width_are_refused(model: TrainedModel) -> None:
    with pytest.raises(InvalidArgument) as error:
        model.scorer().score(np.zeros((3, len(NAMES) - 1)))
    assert error.value.violations[0].field == "matrix"


def test_a_booster_for_other_features_is_refused(model: TrainedModel) -> None:
    with pytest.raises(InvalidArgument) as error:
        Scorer.load(NAMES[:-1], model.booster_text, model.calibration)
    assert error.value.violations[0].field == "feature_names"


@pytest.mark.parametrize(
    "calibration",
    [{"method": "magic"}, {"method": "platt", "a": "1", "b": 0}, {"method": "isotonic", "x": []}],
)
def test_malformed_calibration_is_refused(
    model: TrainedModel, calibration: dict[str, object]
) -> None:
    with pytest.raises(InvalidArgument) as error:
        calibration_from_json(calibration)
    assert error.value.violations[0].field == "calibration"


@pytest.mark.parametrize(
    ("rows", "label", "complaint"),
    [
        ("all", 0, "training rows (cut-offs before 2024-04-12T22:13:20+00:00) have no positive"),
        ("all", 1, "have no negative labels"),
        ("held_out", 0, "validation rows (cut-offs from 2024-04-12T22:13:20+00:00) have no posi"),
    ],
)
def test_labels_of_a_single_class_are_refused(
    profiles: Profiles, rows: str, label: int, complaint: str
) -> None:
    training = profiles.training
    labels = training.labels.copy()
    labels[last_cutoff_rows(training) if rows == "held_out" else slice(None)] = label
    with pytest.raises(InvalidArgument) as error:
        train(with_labels(training, labels))
    assert complaint in error.value.message
    assert [v.field for v in error.value.violations] == ["label"]


def test_a_single_held_out_positive_is_refused(profiles: Profiles) -> None:
    training = profiles.training
    labels = training.labels.copy()
    held_out = np.flatnonzero(last_cutoff_rows(training))
    labels[held_out] = 0
    labels[held_out[0]] = 1
    with pytest.raises(InvalidArgument, match="only 1 positive label"):
        train(with_labels(training, labels))


def test_a_single_cutoff_is_refused() -> None:
    training = generate(cutoffs=1, profiles=500).training
    with pytest.raises(InvalidArgument) as error:
        train(training)
    assert error.value.violations[0].field == "cutoffs"
    assert "at least 2 distinct cut-offs" in error.value.message


def test_labels_other_than_zero_and_one_are_refused(profiles: Profiles) -> None:
    labels = profiles.training.labels.copy()
    labels[7] = 2
    with pytest.raises(InvalidArgument) as error:
        with_labels(profiles.training, labels)
    assert error.value.violations[0].field == "label"


# -- Metrics ----------------------------------------------------------------------------------


def test_top_decile_lift_is_one_for_a_constant_score_and_one_over_the_rate_at_best() -> None:
    labels = np.zeros(1000, dtype=np.int8)
    labels[:50] = 1
    assert top_decile_lift(labels, np.full(1000, 0.3)) == pytest.approx(1.0)
    perfect = np.linspace(1.0, 0.0, 1000)
    assert top_decile_lift(labels, perfect) == pytest.approx(0.05 / 0.1 / 0.05)
    assert top_decile_lift(labels, -perfect) == 0.0


def test_training_rows_whose_label_window_reaches_the_validation_period_are_left_out() -> None:
    day = 86_400 * 10**9
    cutoffs = np.repeat(np.array([0, 30, 60, 90]) * day, 10)
    rng = np.random.default_rng(0)
    training = TrainingSet(
        feature_names=("a",),
        matrix=rng.random((40, 1)),
        labels=np.tile(np.array([0, 1], dtype=np.int8), 20),
        cutoffs=cutoffs.astype(np.int64),
        horizon_ns=45 * day,
    )
    split = split_rows(training)
    # Validation is day 90; a 45-day label from day 60 looks into it, from day 30 it does not.
    assert set(cutoffs[split.train] // day) == {0, 30}
    with pytest.raises(InvalidArgument) as refused:
        split_rows(replace(training, horizon_ns=100 * day))
    assert "horizon" in str(refused.value)
