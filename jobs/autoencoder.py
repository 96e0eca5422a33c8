"""Train the KL autoencoder on the unlabeled shards with Ray Train and export it: ``python jobs/autoencoder.py --config tiny``.

Same as ``histodiff run autoencoder``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "autoencoder", *sys.argv[1:]]))
