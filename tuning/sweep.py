"""Ray job entrypoint for the sweep: ``python tuning/sweep.py --config tiny [--space FILE] [k=v ...]``."""

from __future__ import annotations

import argparse

from histodiff import sweep
from histodiff.config import load_config
from histodiff.runtime import setup_logging
from histodiff.sweep_report import summary_text


def main() -> None:
    """Parse arguments, run the sweep, print the recommendation."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name or YAML path")
    parser.add_argument("--space", default=None, help="search-space YAML (overrides the sweep section)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.thresholds=[0.5,0.9]")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    if args.space:
        cfg = sweep.load_space(cfg, args.space)
    print(summary_text(sweep.run(cfg)))


if __name__ == "__main__":
    main()
