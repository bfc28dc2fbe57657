"""The ``lensfeed`` command, the README's promises, and its fake-producer recipe."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lensfeed.common.config as C
from lensfeed.cli import COMMANDS, main
from tests._util import REPO, child_env

README = REPO / "README.md"

# --------------------------------------------------------------------------- the README recipe
# README.md ("Testing your own training loop") shows exactly the code between the markers below;
# test_readme_recipe_is_this_code keeps the two identical.

# --8<-- [start:recipe]
import torch  # noqa: E402

from lensfeed.common.config import load_config  # noqa: E402
from lensfeed.common.errors import RemoteError  # noqa: E402
from lensfeed.common.spec import DataSpec  # noqa: E402
from lensfeed.producer.fake import FakeProducer  # noqa: E402
from lensfeed.trainer.client import FeedClient  # noqa: E402

CYCLE = ["batch_size=8", "dataset.on_the_fly.samples_per_regeneration_cycle=64"]
TENSORS = {"A": ("float32", (16,))}  # name -> (dtype, per-sample shape) your producer serves


def train(feed, model, opt, num_cycles):
    """Your training loop: it only sees the feed."""
    steps = 0
    for cycle in feed.cycles(num_cycles=num_cycles):
        for batch in cycle:
            loss = model(batch["A"]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


def test_my_loop_consumes_every_cycle():
    spec = DataSpec.from_config(load_config(None, CYCLE))
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fake = FakeProducer("tcp://127.0.0.1:0", spec=spec, rank=0, tensors=TENSORS)
    with fake, FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10, tensors=TENSORS) as feed:
        assert train(feed, model, opt, num_cycles=3) == 3 * 64 // 8
        assert feed.state_dict()["cycle"] == 3  # what you would checkpoint


def test_my_loop_surfaces_producer_errors():
    spec = DataSpec.from_config(load_config(None, CYCLE))
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fake = FakeProducer("tcp://127.0.0.1:0", spec=spec, rank=0, tensors=TENSORS, error_at_cycle=1)
    with fake, FeedClient(fake.endpoint, rank=0, spec=spec, timeout_s=10, tensors=TENSORS) as feed:
        with pytest.raises(RemoteError, match="injected error at cycle 1"):
            train(feed, model, opt, num_cycles=3)
        assert feed.state_dict()["cycle"] == 1  # cycle 0 was consumed in full


# --8<-- [end:recipe]


def _recipe_from(text: str) -> str:
    m = re.search(r"# --8<-- \[start:recipe\]\n(.*?)# --8<-- \[end:recipe\]", text, re.S)
    assert m, "recipe markers not found"
    return m.group(1)


def test_readme_recipe_is_this_code() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    here = _recipe_from(source).replace("  # noqa: E402", "")
    readme = README.read_text(encoding="utf-8")
    block = re.search(r"```python\n(# test_my_loop\.py\n.*?)```", readme, re.S)
    assert block, "README has no '# test_my_loop.py' python block"
    shown = block.group(1).removeprefix("# test_my_loop.py\n")
    shown = shown.replace("import pytest\n", "", 1)
    assert textwrap.dedent(shown).strip() == textwrap.dedent(here).strip()


# --------------------------------------------------------------------------- the command


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    names = {"demo", "metrics", "produce", "train", "fake-produce", "tokenize", "keys"}
    for name in names:
        assert name in out
    assert set(COMMANDS) == names


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"lensfeed {name}" in capsys.readouterr().out


def test_no_or_unknown_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_entry_points_run_as_processes() -> None:
    """``lensfeed`` (console script module), ``python -m producer`` and ``-m trainer``."""
    for module in ("lensfeed.cli", "lensfeed.producer", "lensfeed.trainer"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "usage:" in out.stdout


def test_train_command_reports_config_errors() -> None:
    assert main(["train", "batch_sise=3"]) == 1


# --------------------------------------------------------------------------- README promises


def test_readme_set_up_commands_match_ci() -> None:
    readme = README.read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = "pip install -e '.[dev]' && python -m pytest"
    assert test_cmd in readme
    assert any(line.strip() == test_cmd for line in ci.splitlines())
    assert "pip install -e . && lensfeed demo" in readme


def _config_defaults(cls: type, prefix: str = "") -> dict[str, object]:
    """Every leaf key of the config, dotted, with its default."""
    out: dict[str, object] = {}
    obj = cls()
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_config_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _as_yaml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    if value == "":
        return '""'
    return str(value)


def test_readme_config_reference_has_every_key_and_default() -> None:
    readme = README.read_text(encoding="utf-8")
    table = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", readme, re.M))
    defaults = _config_defaults(C.LensfeedConfig)
    missing = sorted(set(defaults) - set(table))
    assert not missing, f"README config reference lacks {missing}"
    wrong = {k: (table[k], _as_yaml(v)) for k, v in defaults.items() if table[k] != _as_yaml(v)}
    assert not wrong, f"README defaults differ (README, code): {wrong}"


def test_readme_links_exist() -> None:
    readme = README.read_text(encoding="utf-8")
    for target in ("docs/protocol.md", "benchmarks/README.md", "docker-compose.cpu.yml"):
        assert target in readme
