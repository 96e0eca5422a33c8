"""Ray job entrypoint for the whole chain: ``python jobs/pipeline.py --config paper [k=v ...]``.

Same as ``histodiff run pipeline``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "pipeline", *sys.argv[1:]]))
