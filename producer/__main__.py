"""``python -m producer`` / ``lensfeed-producer``."""

from __future__ import annotations

import sys

from lensfeed.producer.main import main

if __name__ == "__main__":
    sys.exit(main())
