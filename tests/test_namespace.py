"""One import namespace: a user's own ``trainer.py`` or ``common/`` cannot shadow lensfeed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lensfeed

pytestmark = pytest.mark.timeout(120)


def test_public_api_and_version() -> None:
    from lensfeed import FakeProducer, FeedClient, load_config

    assert FeedClient.__module__ == "lensfeed.trainer.client"
    assert FakeProducer.__module__ == "lensfeed.producer.fake"
    assert load_config().world_size == 1
    assert lensfeed.__version__
    assert lensfeed.__version__ != "0+unknown"
    assert set(lensfeed.__all__) >= {"FeedClient", "FakeProducer", "load_config", "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lensfeed.nope  # noqa: B018


def test_user_modules_named_like_ours_do_not_shadow_lensfeed(tmp_path: Path) -> None:
    # A user's project: its own trainer.py and common/ package, run from its own directory.
    (tmp_path / "trainer.py").write_text("raise SystemExit('the user trainer.py was imported')\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("raise SystemExit('user common imported')\n")
    (tmp_path / "producer.py").write_text("raise SystemExit('user producer.py imported')\n")
    script = (
        "import sys, lensfeed\n"
        "from lensfeed import FeedClient, FakeProducer, load_config\n"
        "from lensfeed.trainer.client import FeedClient as F2\n"
        "import lensfeed.producer.main, lensfeed.common.protocol, lensfeed.cli\n"
        "assert FeedClient is F2\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('common', 'producer', "
        "'trainer'))\n"
        "assert not bad, bad\n"
        "print('ok', lensfeed.__version__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_import_lensfeed_is_light() -> None:
    """``import lensfeed`` and the CLI's help do not import torch (names load on first use)."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys, lensfeed, lensfeed.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
