"""``profilemesh records match``: deduplicate one CSV file of person records, or link two.

::

    profilemesh records match FILE [FILE2] --id-column ID --out clusters.csv
                              [--threshold 0.95] [--explain pairs.csv] [--settings FILE]

With one file the output is ``record_id,cluster_id``: records with the same cluster id are
one person. With two files it is ``source,record_id,cluster_id``, the source being the file's
name. ``--explain`` writes every matching pair once per comparison, with the level it fell in,
the two values, m, u and the weight, so that a surprising match can be argued with. The default
settings work for person records whatever their columns are called; ``--settings`` reads other
settings (JSON or YAML, the fields of ``MatchSettings``). Exit status: 0 on success, 2 for bad
arguments, unreadable files or unusable columns, each reported in one line.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import yaml
from pydantic import ValidationError

from profilemesh.services.identity.matching import (
    DEFAULT,
    MatchResult,
    MatchSettings,
    match_records,
)
from profilemesh.shared.errors import InvalidArgument

PROGRAM = "profilemesh records match"


class UsageError(Exception):
    """Bad arguments or input: reported in one line, exit status 2."""


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def add_records_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``records`` command (with its ``match`` subcommand) to ``subparsers``."""
    records: argparse.ArgumentParser = subparsers.add_parser(
        "records", help="work with files of customer records", description=__doc__
    )
    actions = records.add_subparsers(dest="records_command", required=True, metavar="ACTION")
    match = actions.add_parser(
        "match",
        help="deduplicate a CSV file of person records, or link two",
        description="Probabilistic matching (Fellegi-Sunter, EM-estimated) of person records.",
    )
    match.add_argument("file", type=Path, help="CSV file of records, with a header row")
    match.add_argument(
        "file2", type=Path, nargs="?", help="a second CSV file: link it to the first"
    )
    match.add_argument("--id-column", required=True, help="column holding each record's id")
    match.add_argument("--out", type=Path, required=True, help="CSV file to write clusters to")
    match.add_argument(
        "--threshold",
        type=_probability,
        help="smallest match probability of a match (default: the settings', 0.95)",
    )
    match.add_argument(
        "--explain", type=Path, metavar="PAIRS_CSV", help="write each match's reasons here"
    )
    match.add_argument(
        "--settings", type=Path, help="matching settings (JSON or YAML) instead of the default"
    )
    return records


def run_records(args: argparse.Namespace) -> int:
    """Run ``profilemesh records`` with parsed ``args``; returns the exit status."""
    try:
        return _match(args)
    except UsageError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    except InvalidArgument as error:
        print(f"{PROGRAM}: {error.message}", file=sys.stderr)
        return 2


def _read_csv(path: Path) -> pa.Table:
    """Every column as text: ids like ``007`` and postcodes like ``0800`` keep their zeros."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if not header:
        raise UsageError(f"{path} is empty: expected a header row")
    try:
        return pa_csv.read_csv(
            path,
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string() for name in header}
            ),
        )
    except (pa.ArrowInvalid, OSError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot parse {path}: {first_line}") from None


def _settings(args: argparse.Namespace) -> MatchSettings:
    settings = DEFAULT
    if args.settings is not None:
        try:
            document = yaml.safe_load(args.settings.read_text())
        except OSError as error:
            raise UsageError(f"cannot read --settings {args.settings}: {error.strerror}") from None
        except yaml.YAMLError:
            raise UsageError(f"--settings {args.settings} is not JSON or YAML") from None
        try:
            settings = MatchSettings.model_validate(document)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "settings"
            raise UsageError(f"--settings {args.settings}: {where}: {problem['msg']}") from None
    if args.threshold is not None:
        settings = settings.with_threshold(args.threshold)
    return settings


def _source_names(first: Path, second: Path) -> tuple[str, str]:
    """The files' names, or their paths as given when the names are the same."""
    if first.name != second.name:
        return first.name, second.name
    return str(first), str(second)


def _require_column(table: pa.Table, column: str, path: Path) -> None:
    if column not in table.column_names:
        raise UsageError(
            f"{path} has no column {column!r} (columns: {', '.join(table.column_names)})"
        )


def _match(args: argparse.Namespace) -> int:
    for output in (args.out, args.explain):
        # Fail before matching, not after it, when a result could not be written.
        if output is not None and not output.resolve().parent.is_dir():
            raise UsageError(f"cannot write {output}: no directory {output.parent}")
    settings = _settings(args)
    left = _read_csv(args.file)
    _require_column(left, args.id_column, args.file)
    right = None
    left_source, right_source = args.file.name, "right"
    if args.file2 is not None:
        right = _read_csv(args.file2)
        _require_column(right, args.id_column, args.file2)
        left_source, right_source = _source_names(args.file, args.file2)
    started = time.perf_counter()
    try:
        result = match_records(
            left,
            right,
            settings,
            id_column=args.id_column,
            left_source=left_source,
            right_source=right_source,
        )
    except InvalidArgument as error:
        # The domain names its inputs "left" and "right"; the user knows them as files.
        files = {"left": str(args.file), "right": str(args.file2)}
        field = error.violations[0].field if error.violations else ""
        side = field.split("[", 1)[0].split(".", 1)[0]
        if side in files:
            raise UsageError(f"{files[side]}: {error.violations[0].description}") from None
        raise
    linking = right is not None
    _write(args.out, _cluster_rows(result, linking))
    if args.explain is not None:
        _write(args.explain, _explanation_rows(result, linking))
    clusters = len(set(result.clusters.values()))
    print(
        f"{len(result.clusters):,} records, {len(result.pairs):,} matching pairs "
        f"(p >= {result.threshold:g}), {clusters:,} clusters in "
        f"{time.perf_counter() - started:.2f}s; wrote {args.out}"
    )
    return 0


def _cluster_rows(result: MatchResult, linking: bool) -> list[list[object]]:
    rows: list[list[object]] = [
        ["source", "record_id", "cluster_id"] if linking else ["record_id", "cluster_id"]
    ]
    for ref, cluster in result.clusters.items():
        rows.append([ref.source, ref.record_id, cluster] if linking else [ref.record_id, cluster])
    return rows


def _explanation_rows(result: MatchResult, linking: bool) -> list[list[object]]:
    sides = ["left_source", "left_id", "right_source", "right_id"]
    header = sides if linking else ["left_id", "right_id"]
    rows: list[list[object]] = [
        [
            *header,
            "match_probability",
            "match_weight",
            "comparison",
            "level",
            "left_value",
            "right_value",
            "m_probability",
            "u_probability",
            "weight",
        ]
    ]
    for pair in result.pairs:
        explanation = result.explain(pair)
        ids: list[object] = (
            [pair.left.source, pair.left.record_id, pair.right.source, pair.right.record_id]
            if linking
            else [pair.left.record_id, pair.right.record_id]
        )
        for c in explanation.comparisons:
            rows.append(
                [
                    *ids,
                    f"{explanation.match_probability:.6f}",
                    f"{explanation.match_weight:.3f}",
                    c.comparison,
                    c.level,
                    c.left_value,
                    c.right_value,
                    f"{c.m_probability:.6g}",
                    f"{c.u_probability:.6g}",
                    f"{c.weight:.3f}",
                ]
            )
    return rows


def _write(path: Path, rows: list[list[object]]) -> None:
    try:
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(rows)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
