"""``profilemesh generate``: write a fictional retailer's data set for the demo.

::

    profilemesh generate --out DIR [--customers 20000] [--seed 7] [--end YYYY-MM-DD]

Writes ``events.jsonl``, ``crm.csv``, ``leads.csv``, ``truth/*.parquet`` and ``manifest.json``
into DIR (see :mod:`profilemesh.services.generator`), then prints one line of counts. The same
seed, size and end date write the same files. The data ends at midnight UTC starting ``--end``
(default: today), so that features' windows see recent activity. Each file is imported with
``profilemesh import``; ``manifest.json`` holds the connector and configuration of each:

    profilemesh import shop --connector jsonl --config path=DIR/events.jsonl
    profilemesh import crm --connector csv --config path=DIR/crm.csv --config kind=records \\
        --config mapping.record_id=record_id --config mapping.updated_at=updated_at \\
        --config mapping.identifiers.email=email --config mapping.identifiers.phone=phone

Exit status: 0 on success, 2 for bad arguments or a folder that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from typing import Any

from tqdm import tqdm

from profilemesh.services.generator.dataset import STEPS, generate

PROGRAM = "profilemesh generate"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def add_generate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``subparsers`` (from ``add_subparsers``); returns it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "generate",
        help="write a seeded demo data set: web events, CRM and leads files, ground truth",
        description="Generate a fictional retailer's customers over twelve months.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    parser.add_argument(
        "--customers", type=_positive, default=20_000, help="number of customers (20000)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed (7)")
    parser.add_argument(
        "--end",
        type=_day,
        help="the data ends at midnight UTC starting this day, YYYY-MM-DD (default: today)",
    )
    return parser


def run_generate(args: argparse.Namespace) -> int:
    """Run ``profilemesh generate`` with parsed ``args``; returns the exit status."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"{PROGRAM}: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    with tqdm(total=len(STEPS), desc="generate", unit=" steps", disable=None) as bar:
        bar.set_postfix_str(STEPS[0])

        def advance(done: str) -> None:
            following = STEPS.index(done) + 1
            bar.set_postfix_str(STEPS[following] if following < len(STEPS) else "", refresh=False)
            bar.update(1)

        try:
            data = generate(out, args.customers, args.seed, args.end, progress=advance)
        except OSError as error:
            bar.close()
            print(f"{PROGRAM}: cannot write {out}: {error.strerror or error}", file=sys.stderr)
            return 2
    print(
        f"{data.customers:,} customers (seed {data.seed}, up to {data.end}): "
        f"{data.events:,} events, {data.orders:,} orders, {data.crm_records:,} CRM records, "
        f"{data.leads:,} leads in {data.seconds:.1f}s; wrote {out}"
    )
    return 0
