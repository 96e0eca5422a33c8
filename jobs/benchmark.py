"""Run every benchmark area (platform/histodiff/bench/<area>.py) and merge into bench/results.json.

``python jobs/benchmark.py [--only AREA] [--output bench/results.json]``
"""

from __future__ import annotations

import argparse

from histodiff.benchmarks import run_benchmarks
from histodiff.runtime import setup_logging


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
