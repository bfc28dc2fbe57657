"""``lensfeed keys DIR``: create the CURVE key set that authenticates and encrypts tcp feeds.

A thin command over :func:`lensfeed.common.keyfiles.create_keys` (pyzmq's certificate format).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lensfeed.common.errors import LensfeedError
from lensfeed.common.keyfiles import create_keys

_WHERE = """\
Set feed.keys_dir={d} on producers and trainers. What each host needs:
  producer hosts: {d}/producer.key_secret and {d}/authorized/ (the trainer keys it accepts)
  trainer hosts:  {d}/trainer.key_secret and {d}/producer.key (the producer key it pins)
Copy secret files with their mode (0600), e.g. scp -p or rsync -p."""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="lensfeed keys",
        description="Create a CURVE key set (producer and trainer key pairs and the producer's "
        "allowlist) in DIR, for authenticated, encrypted tcp between producers and trainers.",
    )
    p.add_argument(
        "dir",
        metavar="DIR",
        help="directory to write the keys to (created 0700 if missing; an existing one must be "
        "yours and not writable by others, and is never chmod'ed)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing key set")
    args = p.parse_args(argv)
    try:
        written = create_keys(args.dir, force=args.force)
    except (LensfeedError, OSError) as exc:
        print(f"lensfeed keys: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(_WHERE.format(d=args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
