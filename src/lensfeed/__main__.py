"""``python -m lensfeed`` is the ``lensfeed`` command."""

from __future__ import annotations

import sys

from lensfeed.cli import main

if __name__ == "__main__":
    sys.exit(main())
