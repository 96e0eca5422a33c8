"""Downstream evaluation, baseline vs augmented over K seeds: ``python jobs/evaluate.py --config tiny``.

Same as ``histodiff run evaluate``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "evaluate", *sys.argv[1:]]))
