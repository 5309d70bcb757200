"""Every benchmark in one go: ``python -m bench [--quick] [--json PATH] [--markdown PATH]``.

Runs each ``bench/NAME.py`` in its own process (so that one's memory and threads never skew
another's), with the same ``--quick`` flag, collects their JSON reports into one file, and
writes a markdown table of every target with its figure, reference ratio and verdict, for the
README's performance section. A benchmark that needs an optional data set or package it cannot
find (FEBRL, Splink, CDNOW) is reported as skipped, not failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCHES = (
    "rpc",
    "log",
    "ingest",
    "identity_graph",
    "identity_febrl",
    "features",
    "cdnow_clv",
    "scoring",
    "cdnow_churn",
    "activation",
    "scaleout",
    "fuzz",
)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, same code paths")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--markdown", type=Path, default=Path("bench-results.md"))
    parser.add_argument("--only", nargs="*", choices=BENCHES, help="run just these")
    return parser.parse_args()


def run_one(name: str, quick: bool, folder: Path) -> dict[str, Any]:
    """One benchmark's report, or why there is none."""
    out = folder / f"{name}.json"
    command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out)]
    if quick:
        command.append("--quick")
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(result.stdout, end="", flush=True)
    if result.returncode != 0 or not out.exists():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        status = "skipped" if result.returncode == 2 else "failed"
        print(f"{name}: {status} ({reason})", file=sys.stderr, flush=True)
        return {"bench": name, "status": status, "reason": reason, "seconds": seconds}
    report: dict[str, Any] = json.loads(out.read_text())
    report.update(status="ran", seconds=seconds)
    return report


def markdown(reports: list[dict[str, Any]], quick: bool) -> str:
    """Every target of every benchmark as a table row."""
    lines = [
        f"Measured with `python -m bench{' --quick' if quick else ''}` on a 2-core machine.",
        "",
        "| benchmark | target | figure | met |",
        "| --- | --- | --- | --- |",
    ]
    for report in reports:
        if report["status"] != "ran":
            lines.append(f"| {report['bench']} | - | {report['status']}: {report['reason']} | - |")
            continue
        figures = report.get("figures", {})
        met = report.get("met_by_target", {})
        for name, description in report.get("targets", {}).items():
            value = figures.get(name, report.get("ratios", {}).get(name))
            shown = f"{value:,.3g}" if isinstance(value, int | float) else "-"
            verdict = "yes" if met.get(name) else "**no**"
            description = description.replace("|", "\\|")
            lines.append(f"| {report['bench']} | `{name}` {description} | {shown} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = _arguments()
    names = args.only or list(BENCHES)
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        reports = [run_one(name, args.quick, Path(folder)) for name in names]
    args.json.write_text(json.dumps({"quick": args.quick, "benches": reports}, indent=2) + "\n")
    args.markdown.write_text(markdown(reports, args.quick))
    print(f"\nwrote {args.json} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
