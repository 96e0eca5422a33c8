"""Run every benchmark area (bench/areas/<area>.py) and merge into bench/results.json, from the repository root.

Same as ``histodiff bench [AREA] [--output bench/results.json] [--quick]``.
"""

import sys

from histodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
