"""Feature values as the contract's ``FeatureValue`` messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import timestamp_pb2

from profilemesh.common.v1 import profile_pb2
from profilemesh.services.features.definitions import FeatureSet, ValueType


def timestamp(nanos: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(nanos)
    return stamp


def feature_value(
    feature_set: FeatureSet, name: str, value: Any, as_of_ns: int | None = None
) -> profile_pb2.FeatureValue:
    """One value, typed by its definition; ``None`` leaves the value unset (null)."""
    # Model outputs (lifetime value) have no definition: version 1, doubles.
    definition = feature_set.get(name)
    message = profile_pb2.FeatureValue(
        name=name, version=definition.version if definition is not None else 1
    )
    if as_of_ns is not None:
        message.as_of.FromNanoseconds(as_of_ns)
    if value is None:
        return message
    kind = definition.result_type if definition is not None else ValueType.DOUBLE
    if kind is ValueType.INT64:
        message.int64_value = int(value)
    elif kind is ValueType.STRING:
        message.string_value = str(value)
    else:
        message.double_value = float(value)
    return message


def feature_values(
    feature_set: FeatureSet, values: Mapping[str, Any], as_of_ns: int | None = None
) -> list[profile_pb2.FeatureValue]:
    """Each of ``values`` as a message, in the mapping's order."""
    return [feature_value(feature_set, name, value, as_of_ns) for name, value in values.items()]
