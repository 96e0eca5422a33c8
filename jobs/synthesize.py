"""Guided synthesis + selection + lineage per class: ``python jobs/synthesize.py --config tiny``."""

from __future__ import annotations

import argparse

from histodiff.augment.synthesize import run
from histodiff.config import load_config
from histodiff.runtime import setup_logging


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config PRESET_OR_YAML`` and dotted overrides, run the synthesis stage, print its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. synthesis.guidance_scale=3")
    args = parser.parse_args(argv)
    setup_logging()
    print(run(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
