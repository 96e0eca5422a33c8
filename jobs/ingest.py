"""Ingest tile folders / S3 prefixes into Parquet tile shards: ``python jobs/ingest.py --config tiny``.

Same as ``histodiff run ingest``: ``--config PRESET_OR_YAML`` plus dotted overrides (``key.sub=value``).
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "ingest", *sys.argv[1:]]))
