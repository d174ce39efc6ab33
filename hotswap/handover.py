"""The old path of hotswap.inside.handover, kept for inis whose hook-accepting runs
`python -m hotswap.handover` (written by `hotswap init` before the layout by role)."""

import sys

from hotswap.inside.handover import main

if __name__ == "__main__":
    sys.exit(main())
