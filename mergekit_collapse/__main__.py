"""`python -m mergekit_collapse ...` (also under `accelerate launch -m mergekit_collapse ...`)."""

import sys

from mergekit_collapse.cli import main
from mergekit_collapse.guard.distributed import exit_launched, launched

if __name__ == "__main__":
    if not launched():
        main()
    try:
        main()
    except SystemExit as e:  # click's way out, whatever the outcome
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        exit_launched(e.code if isinstance(e.code, int) else int(e.code is not None))
    exit_launched(0)
