"""`python -m mergekit_collapse ...` (also under `accelerate launch -m mergekit_collapse ...`)."""

from mergekit_collapse._constants import launched
from mergekit_collapse.cli import main

if __name__ == "__main__":
    if not launched():
        main()
    else:  # leave without the interpreter's teardown (`guard.distributed.exit_launched`)
        from mergekit_collapse.guard.distributed import exit_launched

        try:
            main()
        except SystemExit as e:  # click's way out, whatever the outcome
            exit_launched(e.code)
        exit_launched(0)
