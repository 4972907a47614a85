"""``python -m normcy``: the normcy command line (see :mod:`normcy.cli`)."""
import sys

from normcy.cli import main

if __name__ == "__main__":
    sys.exit(main())
