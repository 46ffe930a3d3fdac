"""`python -m vitmoe ...` is the `vitmoe` command."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
