"""What scoring asks of the features service, over gRPC.

Scoring owns no feature state: online scores read the profile's current vector (one
``GetFeatures`` call, which also resolves an identifier), batch scores and training sets read
point-in-time values (``GetHistoricalFeatures``, Arrow). Two flavours of channel: the asyncio
one serves RPC handlers, the blocking one the rescoring consumer, which runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.ipc

from profilemesh.common.v1 import identifier_pb2, profile_pb2
from profilemesh.features.v1 import (
    feature_definition_pb2,
    feature_vector_pb2,
    features_service_pb2_grpc,
)
from profilemesh.features.v1 import features_service_pb2 as features_pb2
from profilemesh.shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

Floats = np.ndarray[Any, np.dtype[np.float64]]


def value_of(value: profile_pb2.FeatureValue) -> float:
    """A feature value as the models read it: a double, NaN when null or not numeric."""
    kind = value.WhichOneof("value")
    if kind in ("double_value", "int64_value"):
        return float(getattr(value, kind))
    if kind == "bool_value":
        return 1.0 if value.bool_value else 0.0
    return float("nan")


def vector_row(vector: feature_vector_pb2.FeatureVector, names: Sequence[str]) -> Floats:
    """A vector's values in ``names`` order (names as ``name@version``)."""
    by_name = {f"{v.name}@{v.version}": value_of(v) for v in vector.values}
    return np.array([by_name.get(name, np.nan) for name in names], dtype=np.float64)


def _translate(error: grpc.RpcError, what: str) -> Exception:
    """A features error as the error scoring's caller should see."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details or f"{what}: not found", violations=[("profile_id", details)])
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return FailedPrecondition(
            f"the features service refused the model's features: {details}",
            violations=[("feature_names", details)],
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(details, violations=[("feature_names", details)])
    return Unavailable(f"features could not answer {what}: {details}")


def arrow_stream(chunks: Sequence[bytes]) -> pa.Table:
    tables = [pa.ipc.open_stream(chunk).read_all() for chunk in chunks]
    return pa.concat_tables(tables) if tables else pa.table({})


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


class FeaturesClient:
    """The features service, for handlers (async) and for the consumer thread (blocking)."""

    def __init__(
        self,
        connect: Callable[[], grpc.aio.Channel],
        connect_blocking: Callable[[], grpc.Channel],
        deadline_seconds: float = 30.0,
    ) -> None:
        self._connect = connect
        self._connect_blocking = connect_blocking
        self._deadline = deadline_seconds
        self._stub: features_service_pb2_grpc.FeaturesServiceStub | None = None
        self._blocking_stub: features_service_pb2_grpc.FeaturesServiceStub | None = None
        self._channels: list[Any] = []

    def _async(self) -> features_service_pb2_grpc.FeaturesServiceStub:
        if self._stub is None:
            channel = self._connect()
            self._channels.append(channel)
            self._stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        return self._stub

    def _blocking(self) -> features_service_pb2_grpc.FeaturesServiceStub:
        if self._blocking_stub is None:
            channel = self._connect_blocking()
            self._channels.append(channel)
            self._blocking_stub = features_service_pb2_grpc.FeaturesServiceStub(channel)
        return self._blocking_stub

    async def close(self) -> None:
        for channel in self._channels:
            closed = channel.close()
            if asyncio.iscoroutine(closed):
                await closed
        self._channels.clear()
        self._stub = self._blocking_stub = None

    # -- online -------------------------------------------------------------------------------

    async def vector(
        self,
        names: Sequence[str],
        *,
        profile_id: str = "",
        identifier: identifier_pb2.Identifier | None = None,
    ) -> feature_vector_pb2.FeatureVector:
        request = features_pb2.GetFeaturesRequest(feature_names=_plain(names))
        if identifier is not None:
            request.identifier.CopyFrom(identifier)
        else:
            request.profile_id = profile_id
        try:
            response = await self._async().GetFeatures(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as error:
            raise _translate(error, "GetFeatures") from None
        vector: feature_vector_pb2.FeatureVector = response.vector
        return vector

    async def vectors(
        self, profile_ids: Sequence[str], names: Sequence[str]
    ) -> list[feature_vector_pb2.FeatureVector]:
        request = features_pb2.BatchGetFeaturesRequest(
            profile_ids=profile_ids, feature_names=_plain(names)
        )
        try:
            response = await self._async().BatchGetFeatures(request, timeout=self._deadline)
        except grpc.aio.AioRpcError as error:
            raise _translate(error, "BatchGetFeatures") from None
        return list(response.vectors)

    def vectors_blocking(
        self, profile_ids: Sequence[str], names: Sequence[str]
    ) -> list[feature_vector_pb2.FeatureVector]:
        """As :meth:`vectors`, from a worker thread."""
        request = features_pb2.BatchGetFeaturesRequest(
            profile_ids=profile_ids, feature_names=_plain(names)
        )
        response = self._blocking().BatchGetFeatures(request, timeout=self._deadline)
        return list(response.vectors)

    # -- point in time ------------------------------------------------------------------------

    async def historical(
        self,
        names: Sequence[str],
        *,
        cutoffs: Sequence[int] = (),
        rows: pa.Table | None = None,
        extra: Sequence[feature_definition_pb2.FeatureDefinition] = (),
    ) -> pa.Table:
        """Point-in-time values of ``names`` (and ``extra`` definitions) at a spine of
        ``cutoffs`` (ns) or for entity ``rows`` (``profile_id``, ``event_timestamp``)."""
        request = features_pb2.GetHistoricalFeaturesRequest(
            feature_names=_plain(names), extra_definitions=extra
        )
        if rows is not None:
            request.entity_rows_arrow = arrow_bytes(rows)
        for cutoff in cutoffs:
            request.cutoffs.add().FromNanoseconds(int(cutoff))
        try:
            chunks = [
                chunk.arrow_ipc
                async for chunk in self._async().GetHistoricalFeatures(
                    request, timeout=self._deadline * 20
                )
            ]
        except grpc.aio.AioRpcError as error:
            raise _translate(error, "GetHistoricalFeatures") from None
        return arrow_stream(chunks)

    async def definitions(self) -> dict[str, int]:
        """The latest version of every feature, by name."""
        found: dict[str, int] = {}
        token = ""
        while True:
            try:
                page = await self._async().ListFeatureDefinitions(
                    features_pb2.ListFeatureDefinitionsRequest(page_size=1000, page_token=token),
                    timeout=self._deadline,
                )
            except grpc.aio.AioRpcError as error:
                raise _translate(error, "ListFeatureDefinitions") from None
            for definition in page.definitions:
                found[definition.name] = definition.version
            token = page.next_page_token
            if not token:
                return found


def _plain(names: Sequence[str]) -> list[str]:
    """Features asks by ``name@version`` too; scoring always pins versions."""
    return list(names)


def pin(names: Sequence[str], latest: dict[str, int], field: str = "feature_names") -> list[str]:
    """``name`` -> ``name@latest``; ``name@version`` checked. InvalidArgument names the field."""
    pinned = []
    for index, requested in enumerate(names):
        name, _, version = requested.partition("@")
        if name not in latest:
            raise InvalidArgument.for_field(f"{field}[{index}]", f"no feature named {name!r}")
        if version and version != str(latest[name]):
            raise InvalidArgument.for_field(
                f"{field}[{index}]",
                f"{name!r} is at version {latest[name]}; only the latest version is computed",
            )
        pinned.append(f"{name}@{latest[name]}")
    if len(set(pinned)) != len(pinned):
        raise InvalidArgument.for_field(field, "a feature is named twice")
    return pinned


def plain_name(pinned: str) -> str:
    return pinned.partition("@")[0]


def matrix_of(table: pa.Table, names: Sequence[str]) -> Floats:
    """The columns named (``name@version``; tables name them ``name``) as a float matrix."""
    columns = []
    for name in names:
        column = table.column(plain_name(name))
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            columns.append(np.full(table.num_rows, np.nan))
            continue
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        columns.append(np.asarray(values, dtype=np.float64))
    if not columns:
        return np.empty((table.num_rows, 0))
    return np.column_stack(columns)
