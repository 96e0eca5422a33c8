"""Encode tile shards into cached latents with a Ray Data actor pool: ``python jobs/encode.py --config tiny``.

Same as ``histodiff run encode``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "encode", *sys.argv[1:]]))
