"""Train the KL autoencoder on the unlabeled shards with Ray Train and export it: ``python jobs/autoencoder.py --config tiny``."""

from __future__ import annotations

import argparse

from histodiff.config import load_config
from histodiff.train.autoencoder import run
from histodiff.runtime import setup_logging


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config PRESET_OR_YAML`` and dotted overrides, run the autoencoder stage, print its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. autoencoder.steps=200")
    args = parser.parse_args(argv)
    setup_logging()
    print(run(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
