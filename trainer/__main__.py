"""``python -m trainer`` / ``lensfeed-trainer`` (run it under torchrun for several ranks)."""

from __future__ import annotations

import sys

from lensfeed.trainer.main import main

if __name__ == "__main__":
    sys.exit(main())
