"""Downstream evaluation, baseline vs augmented over K seeds: ``python jobs/evaluate.py --config tiny``."""

from __future__ import annotations

import argparse

from histodiff.config import load_config
from histodiff.evaluate.downstream import format_table, run
from histodiff.runtime import setup_logging


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config PRESET_OR_YAML`` and dotted overrides, run the evaluation, print its table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluation.synthetic_ratio=3")
    args = parser.parse_args(argv)
    setup_logging()
    result = run(load_config(args.config, args.overrides))
    print(format_table(result))
    print(f"results: {result.output_uri}" + (" (already complete; skipped)" if result.skipped else ""))


if __name__ == "__main__":
    main()
