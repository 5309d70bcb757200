"""Joining consecutive record batches, as the remote log client does per response."""

from __future__ import annotations

import pytest

from profilemesh.shared.log.api import RecordBatch


def batch(
    base: int, payloads: list[bytes], headers: dict[str, str], partition: int = 0
) -> RecordBatch:
    return RecordBatch(
        partition=partition,
        base_offset=base,
        append_time_ns=base,
        keys=[f"k{base + i}" for i in range(len(payloads))],
        payload_sizes=[len(p) for p in payloads],
        payloads=b"".join(payloads),
        headers=headers,
    )


def test_consecutive_batches_join_keeping_every_record_and_its_headers() -> None:
    first = batch(10, [b"a", b"bb"], {"traceparent": "one", "outbox-seq": "1"})
    second = batch(12, [b"ccc"], {"traceparent": "two", "outbox-seq": "2"})
    joined = RecordBatch.concat([first, second])
    assert joined.base_offset == 10 and joined.next_offset == 13
    assert joined.payload_list() == [b"a", b"bb", b"ccc"]
    assert list(joined.keys) == ["k10", "k11", "k12"]
    assert joined.headers["traceparent"] == "one"  # the consumer links to the first producer
    assert [joined.headers_of(i)["outbox-seq"] for i in range(3)] == ["1", "1", "2"]
    assert joined.headers_of(2)["traceparent"] == "two"
    assert joined.append_time_ns == 12


def test_only_consecutive_batches_of_one_partition_join() -> None:
    with pytest.raises(ValueError):
        RecordBatch.concat([batch(0, [b"a"], {}), batch(5, [b"b"], {})])
    with pytest.raises(ValueError):
        RecordBatch.concat([batch(0, [b"a"], {}), batch(1, [b"b"], {}, partition=1)])
    single = batch(0, [b"a"], {})
    assert RecordBatch.concat([single]) is single
