"""``surfing bench``: the benchmark suite (writes results.json, REPORT.md and plots into --output-dir).

The default output directory is ``./surfing-bench``, never ``./bench``: run from a checkout of this
repository, ``bench/`` holds the committed report, which only an explicit ``--output-dir bench``
(``make bench``) replaces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..exceptions import ConfigurationError
from .options import add_common

#: ``surfing bench``'s output directory when none is given (relative to the current directory)
DEFAULT_OUT = "surfing-bench"


def _print_summary(results: dict, out: str) -> int:
    failed = 0
    for name, case in results["cases"].items():
        if "error" in case:
            failed += 1
            print(f"{name:11} FAILED: {case['error']}")
            continue
        for rname, r in case.get("ratios", {}).items():
            goal = f"  (goal {r['goal']})" if "goal" in r else ""
            print(f"{name:11} {rname:45} {r['median']:9.3g}  [{r['min']:.3g}..{r['max']:.3g}, n={r['n']}]{goal}")
    print(f"wrote {out}/results.json, {out}/REPORT.md and {sum(len(v) for v in results['plots'].values())} "
          f"plots in {results['seconds']:.0f} s")
    return failed


def cmd_bench(args: argparse.Namespace) -> int:
    from ..benchmarks import CASES, run_suite

    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    unknown = [c for c in cases or [] if c not in CASES]
    if unknown:
        raise ConfigurationError(f"unknown --cases {', '.join(unknown)}; choose from {', '.join(CASES)}")
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    notes = [*args.note, *([os.environ["SURFING_BENCH_NOTE"]] if os.environ.get("SURFING_BENCH_NOTE") else [])]
    results = run_suite(args.out, quick=args.quick, cases=cases, progress=progress, chunks_dir=args.chunks_dir,
                        merge=args.merge, notes=notes)
    return 1 if _print_summary(results, args.out) else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark suite: capped generation vs peers, link, transfer, cache, memory... "
                                     f"(writes {DEFAULT_OUT}/)")
    p.add_argument("--quick", action="store_true", help="tiny random-init model, one run per case (a few minutes)")
    p.add_argument("--output-dir", "--out", dest="out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where results.json, REPORT.md and the plots go (default ./{DEFAULT_OUT}; the repository's "
                        "committed report is bench/: `make bench` passes --output-dir bench)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of the cases (default all; an unknown name lists them)")
    p.add_argument("--chunks-dir", default=None, help="benchmark this chunked LLaMA-family model instead")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the top of the report (repeatable; also $SURFING_BENCH_NOTE), e.g. what "
                        "else ran on the machine")
    p.add_argument("--merge", action="store_true",
                   help="keep the other cases' results from DIR/results.json (re-run only --cases)")
    add_common(p)
    p.set_defaults(func=cmd_bench)
