"""`python -m mergekit_collapse ...` (also under `accelerate launch -m mergekit_collapse ...`)."""

from mergekit_collapse.cli import main

if __name__ == "__main__":
    main()
