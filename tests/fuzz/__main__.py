"""``python -m tests.fuzz --calls 100000``: the long fuzz run (see fuzz_engine.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzz_engine import main  # noqa: E402

sys.exit(main())
