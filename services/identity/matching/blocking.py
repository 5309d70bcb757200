"""Blocking: the candidate pairs, i.e. the records that agree on all keys of some rule.

Comparing every pair of n records costs n²; blocking compares only pairs that share a key
(same surname and given name, same date of birth...). Each rule's keys become one integer code
per record, and records are joined on equal codes with a sort and ``searchsorted``, so that
the pairs of a block are produced as numpy arrays without a Python loop over records. The union
over rules keeps, for each pair, the first rule that found it.

In *dedupe* mode both sides are the same records and a pair is kept once, as (lower, higher)
position; in *link* mode the left side is one input and the right side the other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from profilemesh.services.identity.matching.encoding import Codes, Indices
from profilemesh.services.identity.matching.records import RecordSet
from profilemesh.services.identity.matching.settings import (
    BlockingKey,
    BlockingRule,
    BlockingTransform,
)
from profilemesh.shared.errors import InvalidArgument

_SOUNDEX_CODES = {
    **dict.fromkeys("bfpv", "1"),
    **dict.fromkeys("cgjkqsxz", "2"),
    **dict.fromkeys("dt", "3"),
    "l": "4",
    **dict.fromkeys("mn", "5"),
    "r": "6",
}


def soundex(text: str) -> str | None:
    """American Soundex of the letters of ``text`` (``robert`` and ``rupert`` -> ``r163``)."""
    letters = re.sub(r"[^a-z]", "", text.lower())
    if not letters:
        return None
    code = [letters[0]]
    previous = _SOUNDEX_CODES.get(letters[0], "")
    for letter in letters[1:]:
        digit = _SOUNDEX_CODES.get(letter, "")
        if digit and digit != previous:
            code.append(digit)
        if letter not in "hw":  # h and w do not separate letters with the same code
            previous = digit
        if len(code) == 4:
            break
    return "".join(code).ljust(4, "0")


def transform_value(key: BlockingKey, value: str | None) -> str | None:
    """The value a blocking key compares, or ``None`` when the record has no such key."""
    if value is None:
        return None
    if key.transform is BlockingTransform.PREFIX:
        return value[: key.prefix_length]
    if key.transform is BlockingTransform.SOUNDEX:
        return soundex(value)
    if key.transform is BlockingTransform.YEAR:
        year = value[:4]
        return year if year.isdigit() and len(year) == 4 else None
    return value


def rule_keys(rule: BlockingRule, records: RecordSet, *, right_side: bool) -> list[str | None]:
    columns = []
    for key in rule.keys:
        attribute = key.other_attribute if right_side and key.other_attribute else key.attribute
        columns.append([transform_value(key, value) for value in records.values(attribute)])
    keys: list[str | None] = []
    for parts in zip(*columns, strict=True):
        present = [part for part in parts if part is not None]
        keys.append("\x1f".join(present) if len(present) == len(parts) else None)
    return keys


def _encode(left: list[str | None], right: list[str | None]) -> tuple[Codes, Codes]:
    index: dict[str, int] = {}

    def codes(keys: list[str | None]) -> Codes:
        return np.fromiter(
            (-1 if k is None else index.setdefault(k, len(index)) for k in keys),
            dtype=np.int64,
            count=len(keys),
        )

    return codes(left), codes(right)


def _join(left: Codes, right: Codes) -> tuple[Indices, Indices, int]:
    """Every (i, j) with ``left[i] == right[j] >= 0``, and how many there are."""
    order = np.argsort(right, kind="stable")
    ordered = right[order]
    present = np.flatnonzero(left >= 0)
    wanted = left[present]
    start = np.searchsorted(ordered, wanted, side="left")
    counts = np.searchsorted(ordered, wanted, side="right") - start
    total = int(counts.sum())
    left_index = np.repeat(present, counts)
    # Position k of the block of left record i is at start[i] + k in the ordered right side.
    first_of_block = np.cumsum(counts) - counts
    offsets = np.arange(total, dtype=np.int64) + np.repeat(start - first_of_block, counts)
    return left_index.astype(np.int64), order[offsets].astype(np.int64), total


@dataclass(frozen=True, slots=True)
class CandidatePairs:
    """Pairs to compare, as positions into the left and right records, and the rule that
    found each (an index into the rules given)."""

    left_index: Indices
    right_index: Indices
    rule: npt.NDArray[np.int16]
    oversized: tuple[str, ...] = ()
    """Rules skipped because they alone would produce more pairs than allowed."""

    def __len__(self) -> int:
        return len(self.left_index)


def candidate_pairs(
    rules: Sequence[BlockingRule],
    left: RecordSet,
    right: RecordSet | None = None,
    *,
    max_pairs: int,
) -> CandidatePairs:
    """The union of the pairs of every rule; ``right=None`` deduplicates ``left``.

    A rule that alone would produce more than ``max_pairs`` pairs blocks on something too
    common to be useful at this size: it is skipped (and reported in ``oversized``), so that
    the default rules work on any number of records. :class:`InvalidArgument` when every rule
    is that broad.
    """
    dedupe = right is None
    other = left if right is None else right
    width = len(other)
    found: list[npt.NDArray[np.int64]] = []
    oversized: list[str] = []
    for rule in rules:
        left_codes, right_codes = _encode(
            rule_keys(rule, left, right_side=False), rule_keys(rule, other, right_side=True)
        )
        # Count before materialising, so a hopeless rule fails fast instead of eating memory.
        right_sorted = np.sort(right_codes)
        present = left_codes[left_codes >= 0]
        size = int(
            (
                np.searchsorted(right_sorted, present, "right")
                - np.searchsorted(right_sorted, present, "left")
            ).sum()
        )
        if (size // 2 if dedupe else size) > max_pairs:
            oversized.append(f"blocking rule {rule.name}: about {size:,} pairs, over the limit")
            found.append(np.empty(0, dtype=np.int64))
            continue
        i, j, _ = _join(left_codes, right_codes)
        if dedupe:
            keep = i != j
            i, j = i[keep], j[keep]
            low, high = np.minimum(i, j), np.maximum(i, j)
            i, j = low, high
        found.append(i * width + j)
    if len(oversized) == len(rules):
        raise InvalidArgument.for_field(
            "settings.blocking_rules",
            f"every blocking rule yields more than {max_pairs:,} candidate pairs; add keys",
        )
    rule_of = np.concatenate(
        [np.full(len(ids), number, dtype=np.int16) for number, ids in enumerate(found)]
    )
    pair_ids, first = np.unique(np.concatenate(found), return_index=True)
    return CandidatePairs(pair_ids // width, pair_ids % width, rule_of[first], tuple(oversized))
