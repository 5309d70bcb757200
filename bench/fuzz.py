"""Every fuzz target of ``bench/fuzz_targets.py`` run for a time budget: no input may crash.

Hostile input must get a clear error, in bounded time and memory, and never crash a service.
Each target (ingestion's requests, records, tracking-plan files and file sources; activation's
segment expressions, as text and from the grammar) is driven by Hypothesis for ``--seconds``
(60 by default, 5 with ``--quick``), in batches of fresh random examples; a failing input is
shrunk, printed, counted as a crash, and the run goes on. Per target it reports executions
(shrinking included), seconds, executions per second, crashes (the target: 0) and the peak
resident memory while it ran (the target: at most 1 GiB; the peak is reset between targets
where Linux allows it, otherwise it is the process's peak so far).

    python bench/fuzz.py [--quick] [--json PATH] [--seconds S] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_targets import TARGETS, FuzzTarget
from harness import Report

MAX_PEAK_RSS_MIB = 1024.0
BATCH_SECONDS = 2.0
"""A batch of examples aims at this long, so that the budget is kept to within a batch."""


class _OutOfTime(BaseException):
    """The budget is spent: ends a batch at once (Hypothesis passes BaseExceptions through)."""


@dataclass
class Figures:
    """What one target's run measured."""

    executions: int = 0
    seconds: float = 0.0
    crashes: int = 0
    peak_rss_mib: float = 0.0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s per target instead of 60")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures here")
    parser.add_argument("--seconds", type=float, help="the budget per target")
    names = [target.name for target in TARGETS]
    parser.add_argument("--only", nargs="*", choices=names, metavar="NAME", help=", ".join(names))
    return parser.parse_args()


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux 4.0+); without it the peak only grows.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz(target: FuzzTarget, seconds: float) -> Figures:
    """Run ``target`` for ``seconds``; crashes are printed as they are found."""
    figures = Figures()
    last: list[Any] = [None]  # Hypothesis runs the shrunk failing input last
    failing = [False]  # this batch found a crash: let Hypothesis shrink it whatever the time

    def body(value: Any) -> None:
        if not failing[0] and time.monotonic() > deadline:
            raise _OutOfTime
        figures.executions += 1
        last[0] = value
        try:
            target(value)
        except BaseException:
            failing[0] = True
            raise

    _reset_peak_rss()
    started = time.monotonic()
    deadline = started + seconds
    batch = 20
    while (now := time.monotonic()) < deadline:
        before = figures.executions
        failing[0] = False
        test = settings(
            max_examples=batch,
            deadline=None,
            database=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            print_blob=False,
            verbosity=Verbosity.quiet,
        )(given(target.strategy)(body))
        try:
            test()
        except _OutOfTime:
            break
        except BaseException as crash:  # a target's crash of any kind, KeyboardInterrupt aside
            if isinstance(crash, KeyboardInterrupt):
                raise
            figures.crashes += 1
            _print_crash(target, crash, last[0])
        elapsed = time.monotonic() - now
        rate = (figures.executions - before) / max(elapsed, 1e-3)
        remaining = deadline - time.monotonic()
        batch = max(5, min(2000, int(rate * min(BATCH_SECONDS, max(remaining, 0.0)))))
    figures.seconds = time.monotonic() - started
    figures.peak_rss_mib = _peak_rss_mib()
    return figures


def _print_crash(target: FuzzTarget, crash: BaseException, value: Any) -> None:
    frames = traceback.extract_tb(crash.__traceback__)[-4:]
    shown = repr(value)
    print(f"CRASH in {target.name}: {type(crash).__name__}: {str(crash)[:400]}")
    for frame in frames:
        print(f"    {frame.filename}:{frame.lineno} in {frame.name}")
    print(f"  input ({len(shown):,} characters): {shown[:600]}", flush=True)


def main() -> int:
    args = _arguments()
    seconds = args.seconds or (5.0 if args.quick else 60.0)
    chosen = [target for target in TARGETS if not args.only or target.name in args.only]
    report = Report("fuzz")
    print(f"fuzz: {len(chosen)} targets, {seconds:g} s each (pid {os.getpid()})", flush=True)
    print(
        f"  {'target':<30} {'executions':>10} {'seconds':>8} {'exec/s':>8} {'crashes':>7}"
        f" {'peak RSS MiB':>12}"
    )
    for target in chosen:
        figures = fuzz(target, seconds)
        rate = figures.executions / figures.seconds
        print(
            f"  {target.name:<30} {figures.executions:>10,} {figures.seconds:>8.1f} {rate:>8,.0f}"
            f" {figures.crashes:>7} {figures.peak_rss_mib:>12,.0f}",
            flush=True,
        )
        report.figures[f"{target.name}.executions"] = figures.executions
        report.figures[f"{target.name}.seconds"] = figures.seconds
        report.figures[f"{target.name}.executions_per_s"] = rate
        report.figures[f"{target.name}.crashes"] = figures.crashes
        report.figures[f"{target.name}.peak_rss_mib"] = figures.peak_rss_mib
        report.target(f"{target.name}.crashes", "= 0", figures.crashes == 0)
        report.target(
            f"{target.name}.peak_rss_mib",
            f"<= {MAX_PEAK_RSS_MIB:,.0f} MiB",
            figures.peak_rss_mib <= MAX_PEAK_RSS_MIB,
        )
    report.print()
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
