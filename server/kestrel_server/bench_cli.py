"""`kestrel bench latency | throughput | serve [ARGS...]`: the benchmark scripts as commands.

The scripts stay in the repository's `benchmarks/` (they are not part of the installed
package, and `python benchmarks/X.py` keeps working); the command runs the script with the
same Python and passes every further argument on (`kestrel bench latency --help` shows the
script's own flags). The folder is found next to this package in a source checkout (an
editable install), or at $KESTREL_BENCHMARKS_DIR.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = {
    "latency": ("latency.py", "batch-1 TTFT and TPOT (offline engine)"),
    "throughput": ("offline_throughput.py", "offline throughput of a batch of prompts"),
    "serve": ("serving.py", "a streaming load generator against a running server"),
}


def benchmarks_dir() -> Path | None:
    env = os.environ.get("KESTREL_BENCHMARKS_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks")
    for folder in candidates:
        if (folder / "common.py").is_file():
            return folder
    return None


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark (latency, throughput, serve)",
        description="Run one of the benchmark scripts of benchmarks/; every argument after "
        "the benchmark's name goes to the script.",
    )
    p.add_argument("benchmark", choices=sorted(SCRIPTS), help="which benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own flags")
    p.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    if folder is None:
        print(
            "kestrel bench: error: the benchmarks/ folder was not found (it ships with the "
            "source checkout, not the wheel); set KESTREL_BENCHMARKS_DIR to it",
            file=sys.stderr,
        )
        return 2
    script = folder / SCRIPTS[args.benchmark][0]
    return subprocess.call([sys.executable, str(script), *args.script_args])
