"""Pretrain the unconditional latent denoiser on cached latents: ``python jobs/pretrain.py --config tiny``.

Ray Train DDP with checkpoints under ``paths.checkpoints``; rerunning the same command resumes
from the newest complete checkpoint, or skips when the exported denoiser is up to date.
"""

from __future__ import annotations

import argparse

from histodiff.config import load_config
from histodiff.runtime import setup_logging
from histodiff.train.denoiser import run


def main(argv: list[str] | None = None) -> None:
    """Parse ``--config PRESET_OR_YAML`` and dotted overrides, run the pretrain stage, print its result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. denoiser.steps=2000")
    args = parser.parse_args(argv)
    setup_logging()
    print(run(load_config(args.config, args.overrides)))


if __name__ == "__main__":
    main()
