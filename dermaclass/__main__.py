"""``python -m dermaclass``: the same command-line interface as ``dermaclass``."""

from dermaclass.cli import main

if __name__ == "__main__":
    main()
