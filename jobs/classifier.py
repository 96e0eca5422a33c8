"""Train the noisy-latent classifier on the labeled train split: ``python jobs/classifier.py --config tiny``."""

from __future__ import annotations

import argparse

from histodiff.config import load_config
from histodiff.runtime import setup_logging
from histodiff.train.latent_classifier import run


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config PRESET_OR_YAML`` and dotted overrides, run the classifier stage, print its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. classifier.mode=clean")
    args = parser.parse_args(argv)
    setup_logging()
    print(run(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
