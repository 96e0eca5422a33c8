"""Train the noisy-latent classifier on the labeled train split: ``python jobs/classifier.py --config tiny``.

Same as ``histodiff run classifier``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "classifier", *sys.argv[1:]]))
