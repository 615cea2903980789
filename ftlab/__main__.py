"""``python -m ftlab OVERRIDES`` trains; see ``ftlab.cli``."""

from ftlab.cli import main

if __name__ == "__main__":
    main()
