"""Pretrain the unconditional latent denoiser on cached latents: ``python jobs/pretrain.py --config tiny``.

Same as ``histodiff run pretrain``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "pretrain", *sys.argv[1:]]))
