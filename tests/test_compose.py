"""docker-compose.yml: its structure, and its services' commands run here as local processes.

Compose is emulated just enough to run the real commands: ``${VAR:-default}`` interpolation,
``$$`` escapes, the service's ``environment``, paths inside the container mapped into
``tmp_path`` (``/app`` = working directory, ``/keys`` = the shared key volume) and the
``producer`` host name mapped to loopback.
``docker-compose config`` itself is checked where the tool is installed.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._util import REPO, Procs

BASE = REPO / "docker-compose.yml"
CPU = REPO / "docker-compose.cpu.yml"
_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-file interpolation: ``${X}``, ``${X:-d}``, ``${X-d}``; ``$$`` -> ``$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group("braced"), m.group("default")
        got = env.get(name)
        return got if got else (default or "")

    return _VAR.sub(sub, value)


def load(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(path.read_text()), env or {})


def test_compose_file_structure() -> None:
    raw = yaml.safe_load(BASE.read_text())
    assert raw["version"] in ("2.4", "3.8")
    assert "include" not in raw
    assert "producer-1" not in BASE.read_text()  # no per-rank blocks to copy any more
    cfg = load(BASE)
    services = cfg["services"]
    assert set(services) == {"producer", "trainer"}  # one producer service whatever the world
    for name, svc in services.items():
        assert "develop" not in svc
        assert svc["init"] is True, name
        assert svc["runtime"] == "nvidia", name  # GPUs by default
        assert svc["environment"]["LENSFEED_CONFIG"] == "conf/demo.yaml"
        assert "keys:/keys" in svc["volumes"]
        assert "data:/app/data" in svc["volumes"]
        assert "feed.keys_dir=/keys" in svc["command"][-1], name  # CURVE between containers
        assert "feed.endpoint=tcp://producer:{port}" in svc["command"][-1], name
    producer = services["producer"]
    assert producer["restart"] == "on-failure"
    assert not {"LENSFEED_RANK", "CUDA_VISIBLE_DEVICES"} & set(producer["environment"])
    command = producer["command"][-1]
    assert '--ranks "0-$(( LENSFEED_WORLD_SIZE - 1 ))"' in command
    assert "lensfeed demo --prepare-only" in command
    assert "feed.exit_on_bye=false" in command
    assert producer["healthcheck"]["test"][0] == "CMD-SHELL"
    deps = services["trainer"]["depends_on"]
    assert deps == {"producer": {"condition": "service_healthy"}}
    assert "torchrun" in services["trainer"]["command"][-1]
    assert set(cfg["volumes"]) == {"data", "runs", "keys"}

    base_image = services["trainer"]["build"]["args"]["BASE_IMAGE"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={base_image}\nFROM ${{BASE_IMAGE}}" in dockerfile

    cpu = yaml.safe_load(CPU.read_text())
    assert cpu["version"] == raw["version"]
    assert {n: s["runtime"] for n, s in cpu["services"].items()} == dict.fromkeys(services, "runc")


def _shims(bin_dir: Path) -> None:
    """``lensfeed`` and ``torchrun`` for this interpreter (the image has both on PATH)."""
    bin_dir.mkdir()
    for name, module in (("lensfeed", "lensfeed.cli"), ("torchrun", "torch.distributed.run")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)


def _local(value: Any, app: Path, keys: Path) -> Any:
    """Map container paths and the producer's host name to local ones."""
    if isinstance(value, list):
        return [_local(v, app, keys) for v in value]
    if isinstance(value, dict):
        return {k: _local(v, app, keys) for k, v in value.items()}
    text = str(value).replace("/keys", str(keys)).replace("/app", str(app))
    return text.replace("tcp://producer:", "tcp://127.0.0.1:")


def _lines(p: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            q.put(line)
        q.put("")

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_for(q: queue.Queue[str], text: str, timeout: float) -> str:
    deadline, seen = time.monotonic() + timeout, []
    while True:
        line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(line)
        if text in line:
            return "".join(seen)
        if line == "":
            raise AssertionError(f"process ended before {text!r}:\n{''.join(seen)}")


@pytest.mark.slow
def test_services_run_as_local_processes(tmp_path: Path, procs: Procs) -> None:
    app, keys, bin_dir = tmp_path / "app", tmp_path / "keys", tmp_path / "bin"
    app.mkdir()
    shutil.copytree(REPO / "conf", app / "conf")
    _shims(bin_dir)
    host_env = {
        # short cycles; everything else is the stack's defaults
        "LENSFEED_OVERRIDES": "dataset.on_the_fly.samples_per_regeneration_cycle=256 "
        "training.num_cycles=2 training.progress=false",
    }
    services = load(BASE, host_env)["services"]

    def start(name: str) -> subprocess.Popen[str]:
        svc = services[name]
        env = {k: str(v) for k, v in _local(svc["environment"], app, keys).items()}
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        env.pop("CUDA_VISIBLE_DEVICES", None)
        cwd = Path(_local(svc["working_dir"], app, keys))
        return procs.start(_local(svc["command"], app, keys), cwd=cwd, **env)

    world = int(services["producer"]["environment"]["LENSFEED_WORLD_SIZE"])
    health = _local(services["producer"]["healthcheck"]["test"], app, keys)

    def healthy() -> bool:
        env = {
            **os.environ,
            "LENSFEED_WORLD_SIZE": str(world),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        }
        return subprocess.run(["sh", "-c", health[1]], env=env, timeout=10).returncode == 0

    assert not healthy()  # no ports yet
    producer = start("producer")
    lines = _lines(producer)
    for _ in range(world):  # children start together; their lines arrive in any order
        _wait_for(lines, f"/{world} serving", timeout=90)
    # depends_on: service_healthy -> the healthcheck must pass now
    assert healthy()
    assert (keys / "authorized" / "trainer.key").is_file()  # the producer made the key set

    trainer = start("trainer")
    code, out = procs.wait(trainer, timeout=120)
    assert code == 0, out
    metrics = (app / "runs" / "demo" / "metrics.jsonl").read_text()
    assert '"training_status": "ok"' in metrics
    assert producer.poll() is None  # still serving (exit_on_bye=false)


def _compose_tools() -> list[list[str]]:
    tools = []
    if shutil.which("docker-compose"):
        tools.append(["docker-compose"])
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            tools.append(["docker", "compose"])
    return tools


@pytest.mark.parametrize("files", [[BASE], [BASE, CPU]], ids=["gpu", "cpu"])
def test_compose_config_is_valid(files: list[Path]) -> None:
    tools = _compose_tools()
    if not tools:
        pytest.skip("neither docker-compose nor docker compose is installed")
    for tool in tools:
        args = [a for f in files for a in ("-f", str(f))]
        out = subprocess.run(
            [*tool, *args, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, f"{' '.join(tool)}: {out.stderr}"
