"""Run every benchmark area (bench/areas/<area>.py) and merge into bench/results.json.

``python jobs/benchmark.py [--only AREA] [--output bench/results.json]``, from the repository root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The benchmarks are the top-level package ``bench``, not part of the installed histodiff.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.runner import run_benchmarks  # noqa: E402
from histodiff.runtime import setup_logging  # noqa: E402


def main() -> None:
    """Parse arguments, run the benchmarks, print each figure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None, help="one area, e.g. guidance")
    parser.add_argument("--output", default="bench/results.json")
    parser.add_argument("--workdir", default="bench/_work")
    args = parser.parse_args()
    setup_logging()
    for key, value in run_benchmarks(args.output, only=args.only, workdir=args.workdir).items():
        print(f"{key}: {value.get('value')} {value.get('unit', '')}")


if __name__ == "__main__":
    main()
