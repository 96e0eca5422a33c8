"""Guided synthesis + selection + lineage per class: ``python jobs/synthesize.py --config tiny``.

Same as ``histodiff run synthesize``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "synthesize", *sys.argv[1:]]))
