from __future__ import annotations

from pathlib import Path

import pytest

from tests._activations import write_token_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    """A 40 x 16 random-token dataset (ids < 256) for the activation-builder tests."""
    return write_token_dataset(tmp_path / "ds")
