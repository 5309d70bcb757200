"""Values numbered once, so that pairs compare integers and each distinct string pair is
scored only once.

Every normalised value of every attribute on both sides gets one code in a shared
:class:`Vocabulary` (missing values are -1). Pairs of records then become pairs of code arrays:
equality is an integer comparison, and a string similarity is computed per *distinct* code pair
(``smith``/``smyth`` appears in thousands of pairs but is scored once). Sharing one vocabulary
across attributes lets a level compare one attribute with another (swapped names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Codes = npt.NDArray[np.int64]
"""Codes of values, -1 for missing."""
Indices = npt.NDArray[np.int64]
"""Positions in an array of records or pairs."""
Mask = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]


class Vocabulary:
    """Distinct strings and their codes, with per-code facts computed on demand."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.strings: list[str] = []
        self._derived: dict[str, Floats] = {}
        self._known: dict[str, npt.NDArray[np.bool_]] = {}

    def __len__(self) -> int:
        return len(self.strings)

    def encode(self, values: Iterable[str | None]) -> Codes:
        """The codes of ``values`` (-1 for ``None``), adding new strings."""
        index, strings = self._index, self.strings
        codes: list[int] = []
        for value in values:
            if value is None:
                codes.append(-1)
                continue
            code = index.get(value)
            if code is None:
                code = index[value] = len(strings)
                strings.append(value)
            codes.append(code)
        return np.asarray(codes, dtype=np.int64)

    def derived(self, name: str, compute: Callable[[str], float], codes: Codes) -> Floats:
        """``compute(string)`` for each entry of ``codes`` (NaN for missing codes).

        Cached per ``name`` and code, so a fact about a value (the day number of a date) is
        worked out once however many pairs and comparisons ask for it.
        """
        size = len(self.strings) + 1  # the last slot answers code -1 with NaN
        table, known = self._derived.get(name), self._known.get(name)
        if table is None or known is None or len(table) < size:
            grown, grown_known = np.full(size, np.nan), np.zeros(size, dtype=bool)
            if table is not None and known is not None:
                grown[: len(table) - 1] = table[:-1]
                grown_known[: len(known) - 1] = known[:-1]
            self._derived[name], self._known[name] = grown, grown_known
            table, known = grown, grown_known
        todo = np.unique(codes[(codes >= 0) & ~known[codes]])
        for code in todo.tolist():
            table[code] = compute(self.strings[code])
        known[todo] = True
        return np.asarray(table[codes], dtype=np.float64)


@dataclass(slots=True)
class EncodedSides:
    """The codes of each attribute for the left and the right records."""

    vocabulary: Vocabulary
    left: dict[str, Codes] = field(default_factory=dict)
    right: dict[str, Codes] = field(default_factory=dict)


@dataclass(slots=True)
class PairCodes:
    """Pairs of records as positions (left, right) into the encoded sides."""

    sides: EncodedSides
    left_index: Indices
    right_index: Indices
    _cache: dict[tuple[str, str], Codes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.left_index)

    def left(self, attribute: str) -> Codes:
        """Codes of ``attribute`` of each pair's left record."""
        key = ("left", attribute)
        if key not in self._cache:
            self._cache[key] = self.sides.left[attribute][self.left_index]
        return self._cache[key]

    def right(self, attribute: str) -> Codes:
        """Codes of ``attribute`` of each pair's right record."""
        key = ("right", attribute)
        if key not in self._cache:
            self._cache[key] = self.sides.right[attribute][self.right_index]
        return self._cache[key]
