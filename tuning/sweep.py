"""Ray job entrypoint for the sweep: ``python tuning/sweep.py --config tiny [--space FILE] [k=v ...]``.

Same as ``histodiff sweep``: ``--config PRESET_OR_YAML``, ``--space SEARCH_SPACE_YAML`` and dotted overrides.
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
