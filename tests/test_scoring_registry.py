"""The model registry on both store backends: versions numbered per model, one champion per
model, clusterings versioned alike, and everything still there when the store is opened again
(a restarted scoring pod on the ``postgres`` backend finds every model it trained)."""

from __future__ import annotations

import pytest

from profilemesh.scoring.v1 import clustering_pb2, model_pb2
from profilemesh.services.scoring.registry import ModelRegistry
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.store_backends import StoreHarness

# A LightGBM text model is large: the registry keeps it whole, as TEXT (SQLite) or TEXT/BYTEA.
BOOSTER = "tree\n" + "split_feature=0 1 2\n" * 20_000


def _version(
    model: str, kind: model_pb2.ModelKind.ValueType = model_pb2.MODEL_KIND_CHURN
) -> model_pb2.ModelVersion:
    return model_pb2.ModelVersion(
        model=model, kind=kind, description=f"{model} model", feature_names=["a", "b"]
    )


def _registry(stores: StoreHarness) -> ModelRegistry:
    return ModelRegistry(stores.open("registry"))


def test_versions_are_numbered_per_model_and_the_first_is_champion(stores: StoreHarness) -> None:
    registry = _registry(stores)
    first = registry.register(_version("churn"), BOOSTER, {"a": 1.0})
    second = registry.register(_version("churn"), "tree 2", {"a": 2.0})
    other = registry.register(_version("buyers", model_pb2.MODEL_KIND_PROPENSITY), "t", {})
    assert (first.version, first.champion) == ("1", True)
    assert (second.version, second.champion) == ("2", False)
    assert (other.version, other.champion) == ("1", True)
    assert second.state == model_pb2.MODEL_STATE_READY
    champion = registry.get("churn")
    assert champion.metadata.version == "1" and champion.metadata.champion
    assert champion.booster_text == BOOSTER and champion.calibration == {"a": 1.0}
    assert registry.get("churn", "2").booster_text == "tree 2"
    assert registry.kind_of("churn") == model_pb2.MODEL_KIND_CHURN
    assert registry.kind_of("nothing") is None
    listed = [(v.model, v.version, v.champion) for v in registry.versions()]
    assert listed == [("buyers", "1", True), ("churn", "2", False), ("churn", "1", True)]
    assert [v.model for v in registry.versions(kind=model_pb2.MODEL_KIND_PROPENSITY)] == ["buyers"]
    assert [v.version for v in registry.versions("churn", champions_only=True)] == ["1"]
    assert [c.metadata.model for c in registry.champions()] == ["buyers", "churn"]


def test_a_model_keeps_its_kind_and_unknown_versions_are_not_found(stores: StoreHarness) -> None:
    registry = _registry(stores)
    registry.register(_version("churn"), "t", {})
    with pytest.raises(InvalidArgument, match="another kind"):
        registry.register(_version("churn", model_pb2.MODEL_KIND_LEAD), "t", {})
    assert [v.version for v in registry.versions("churn")] == ["1"]
    with pytest.raises(NotFound):
        registry.get("churn", "7")
    with pytest.raises(NotFound):
        registry.get("missing")
    with pytest.raises(InvalidArgument, match="whole numbers"):
        registry.get("churn", "latest")


def test_promotion_moves_the_champion(stores: StoreHarness) -> None:
    registry = _registry(stores)
    for booster in ("one", "two", "three"):
        registry.register(_version("churn"), booster, {})
    promoted, previous = registry.promote("churn", "3")
    assert (promoted.version, promoted.champion, previous) == ("3", True, "1")
    assert registry.get("churn").booster_text == "three"
    assert [(v.version, v.champion) for v in registry.versions("churn")] == [
        ("3", True),
        ("2", False),
        ("1", False),
    ]
    assert registry.promote("churn", "3")[1] == ""
    with pytest.raises(NotFound):
        registry.promote("churn", "9")


def test_only_a_ready_version_can_be_promoted(stores: StoreHarness) -> None:
    registry = _registry(stores)
    registry.register(_version("churn"), "t", {})
    registry.register(_version("churn"), "t", {})
    with stores.open("registry").transaction() as tx:
        archived = _version("churn")
        archived.version, archived.state = "2", model_pb2.MODEL_STATE_ARCHIVED
        tx.execute(
            "UPDATE model_versions SET metadata = ? WHERE model = ? AND version = ?",
            (archived.SerializeToString(), "churn", 2),
        )
    with pytest.raises(FailedPrecondition, match="READY"):
        registry.promote("churn", "2")


def test_clusterings_are_versioned_and_the_latest_ones_listed(stores: StoreHarness) -> None:
    registry = _registry(stores)
    for name, centres in (("rfm", [1.0]), ("rfm", [2.0]), ("engagement", [3.0])):
        stored = registry.register_clustering(
            clustering_pb2.Clustering(name=name, feature_names=["x"]), {"centres": centres}
        )
    assert stored.version == "1"
    assert registry.clustering("rfm").model == {"centres": [2.0]}
    assert registry.clustering("rfm", "1").metadata.version == "1"
    latest = [(c.metadata.name, c.metadata.version) for c in registry.latest_clusterings()]
    assert latest == [("engagement", "1"), ("rfm", "2")]
    with pytest.raises(NotFound):
        registry.clustering("missing")


def test_the_registry_survives_a_restart(stores: StoreHarness) -> None:
    registry = _registry(stores)
    registry.register(_version("churn"), BOOSTER, {"k": [1, 2]})
    registry.register(_version("churn"), "two", {})
    registry.promote("churn", "2")
    registry.register_clustering(clustering_pb2.Clustering(name="rfm"), {"c": 1})
    registry.close()
    reopened = _registry(stores)
    assert reopened.get("churn").booster_text == "two"
    assert reopened.get("churn", "1").booster_text == BOOSTER
    assert reopened.register(_version("churn"), "three", {}).version == "3"
    assert reopened.clustering("rfm").model == {"c": 1}
