"""Who may talk to a producer: CURVE keys on tcp, private ipc directories, the insecure switch,
session ownership, and refusals that tell an unauthenticated peer nothing of ours.

The CURVE matrix runs against a real producer process while a legitimate session is mid-cycle:
every intruder is refused, and the session's batches are still exactly the shard's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from pathlib import Path

import pytest
import zmq

from lensfeed.common import protocol as P
from lensfeed.common.config import FeedConfig, load_config
from lensfeed.common.curve import is_loopback
from lensfeed.common.errors import AuthenticationError, ConfigError, RemoteError
from lensfeed.common.ipc import check_ipc_dir
from lensfeed.common.keyfiles import client_keys, create_keys, server_keys
from lensfeed.common.spec import DataSpec
from lensfeed.keys import main as keys_main
from lensfeed.producer.cycle import CycleCursor
from lensfeed.producer.fake import FakeProducer
from lensfeed.trainer.client import FeedClient
from tests._util import free_port, make_dataset, python_cmd

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def keysets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two independent key sets: ``a`` (the real one) and ``b`` (a stranger's)."""
    base = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("a", "b"):
        create_keys(base / name)
        out[name] = base / name
    return out


def mixed_keys(tmp: Path, *, trainer_from: Path, producer_from: Path) -> Path:
    """A trainer-side key dir holding one set's trainer key and another set's producer key."""
    d = tmp / f"mixed-{trainer_from.name}-{producer_from.name}"
    d.mkdir(mode=0o700)
    shutil.copy2(trainer_from / "trainer.key_secret", d / "trainer.key_secret")
    shutil.copy2(producer_from / "producer.key", d / "producer.key")
    return d


# --------------------------------------------------------------------------- keys


def test_keys_command_writes_a_private_key_set(tmp_path: Path, capsys) -> None:
    d = tmp_path / "k"
    assert keys_main([str(d)]) == 0
    out = capsys.readouterr().out
    assert f"feed.keys_dir={d}" in out
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in ("producer", "trainer"):
        assert stat.S_IMODE(os.stat(d / f"{name}.key_secret").st_mode) == 0o600
        assert (d / f"{name}.key").is_file()
    assert (d / "authorized" / "trainer.key").is_file()
    server, client = server_keys(d), client_keys(d)
    assert client.server_public == server.public  # the trainer pins this producer
    assert keys_main([str(d)]) == 1  # never overwrites a key set by accident
    assert "already holds keys" in capsys.readouterr().err
    assert keys_main([str(d), "--force"]) == 0
    assert client_keys(d).server_public != server.public


def test_a_secret_key_readable_by_others_is_refused(keysets: dict[str, Path], tmp_path: Path):
    d = tmp_path / "k"
    shutil.copytree(keysets["a"], d)
    os.chmod(d / "trainer.key_secret", 0o644)
    with pytest.raises(ConfigError, match="readable by other users; chmod 600"):
        client_keys(d)
    with pytest.raises(ConfigError, match="not found"):
        server_keys(tmp_path / "nowhere")


def test_loopback_is_told_from_reachable_addresses() -> None:
    assert is_loopback("ipc:///tmp/x.sock")
    assert is_loopback("tcp://127.0.0.1:5555")
    assert is_loopback("tcp://127.0.0.9:5555")
    assert is_loopback("tcp://localhost:5555")
    assert is_loopback("tcp://[::1]:5555")
    assert not is_loopback("tcp://0.0.0.0:5555")
    assert not is_loopback("tcp://*:5555")
    assert not is_loopback("tcp://10.1.2.3:5555")
    assert not is_loopback("tcp://eth0:5555")


def test_an_ipc_directory_others_can_open_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(ConfigError, match="must be private to this user"):
        check_ipc_dir(f"ipc://{shared}/r0.sock")
    fresh = tmp_path / "fresh" / "sub"
    check_ipc_dir(f"ipc://{fresh}/r0.sock")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    missing = tmp_path / "missing"
    check_ipc_dir(f"ipc://{missing}/r0.sock")  # a client makes it private too
    assert stat.S_IMODE(os.lstat(missing).st_mode) == 0o700


# --------------------------------------------------------------------------- producer process


def producer_args(tmp_path: Path, endpoint: str, *extra: str) -> list[str]:
    data = tmp_path / "ds"
    if not data.exists():
        make_dataset(data, rows=40)
    return [
        "--rank",
        "0",
        "world_size=1",
        "batch_size=2",
        "seed=1",
        "dataset.on_the_fly.samples_per_regeneration_cycle=8",
        f"dataset.path={data}",
        f"feed.endpoint={endpoint}",
        "feed.error_linger_s=0",
        *extra,
    ]


def test_a_non_loopback_bind_needs_keys_or_the_insecure_switch(procs, tmp_path: Path) -> None:
    port = free_port()
    args = producer_args(tmp_path, f"tcp://127.0.0.1:{port}", f"feed.bind=tcp://0.0.0.0:{port}")
    code, out = procs.wait(procs.start(python_cmd("lensfeed.producer", *args)), timeout=60)
    assert code == 1, out
    assert "refusing to bind tcp://0.0.0.0" in out
    assert "feed.keys_dir" in out
    # With the switch it serves, and says at start what that means.
    p = procs.start(python_cmd("lensfeed.producer", *args, "feed.insecure=true"))
    cfg = load_config(None, args[2:])
    with FeedClient(cfg.endpoint_for(0), rank=0, spec=DataSpec.from_config(cfg), timeout_s=30) as f:
        assert sum(1 for _ in f.next_cycle()) == 4
    code, out = procs.wait(p, timeout=30)
    assert code == 0, out
    assert "feed.insecure: serving tcp://0.0.0.0" in out


def test_a_producer_refuses_a_shared_ipc_directory(procs, tmp_path: Path) -> None:
    shared = tmp_path / "run"
    shared.mkdir()
    os.chmod(shared, 0o777)
    args = producer_args(tmp_path, f"ipc://{shared}/r{{rank}}.sock")
    code, out = procs.wait(procs.start(python_cmd("lensfeed.producer", *args)), timeout=60)
    assert code == 1, out
    assert f"ipc directory {shared}" in out
    assert "chmod 700" in out


def client(cfg, keys_dir: Path | str, **kw) -> FeedClient:
    return FeedClient.from_config(cfg, 0, keys_dir=str(keys_dir), timeout_s=20, **kw)


def test_curve_matrix_refuses_every_intruder_and_the_session_goes_on(
    procs, tmp_path: Path, keysets: dict[str, Path]
) -> None:
    a, b = keysets["a"], keysets["b"]
    port = free_port()
    args = producer_args(
        tmp_path,
        f"tcp://127.0.0.1:{port}",
        f"feed.bind=tcp://0.0.0.0:{port}",  # reachable from elsewhere: needs CURVE
        f"feed.keys_dir={a}",
        "feed.exit_on_bye=false",
    )
    p = procs.start(python_cmd("lensfeed.producer", *args))
    cfg = load_config(None, args[2:])
    spec = DataSpec.from_config(cfg)
    cursor = CycleCursor(spec, rank=0, shard_rows=40)
    with client(cfg, a) as legit:
        cycle = legit.next_cycle()
        it = iter(cycle)
        got = [next(it)["sample_idx"].tolist()]  # the session is mid-cycle now
        intruders = {
            # an impostor's view: pins another producer key (the real one cannot answer it)
            "wrong server key": (mixed_keys(tmp_path, trainer_from=a, producer_from=b), "pinned"),
            "unknown client key": (
                mixed_keys(tmp_path, trainer_from=b, producer_from=a),
                "refused this trainer's CURVE key",
            ),
            "no keys": ("", "one side uses CURVE and the other does not"),
        }
        for what, (keys_dir, needle) in intruders.items():
            with (
                pytest.raises(AuthenticationError) as exc_info,
                client(cfg, keys_dir, reconnect_timeout_s=30) as bad,
            ):
                bad.connect()
            assert needle in str(exc_info.value), what
            assert f"127.0.0.1:{port}" in str(exc_info.value)
        # A raw plain socket spewing garbage never gets past the handshake either.
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(50):
            raw.send_multipart([b"\x00garbage"], flags=zmq.NOBLOCK)
        assert not raw.poll(300)
        raw.close()
        ctx.term()
        got += [batch["sample_idx"].tolist() for batch in it]
    assert got == [cursor.batch_rows(0, j).tolist() for j in range(4)]
    assert p.poll() is None  # still serving
    # The same key may take the session over (a restarted trainer resumes).
    with client(cfg, a) as again:
        assert again.next_cycle().index == 0


def test_an_impostor_producer_is_refused_by_a_pinned_client(
    tmp_path: Path, keysets: dict[str, Path]
) -> None:
    spec = DataSpec.from_config(load_config(None, ["batch_size=2"]))
    feed = FeedConfig(keys_dir=str(keysets["b"]), exit_on_bye=False)
    with (
        FakeProducer(f"tcp://127.0.0.1:{free_port()}", spec=spec, feed=feed) as impostor,
        FeedClient(impostor.endpoint, rank=0, spec=spec, keys_dir=keysets["a"]) as c,
        pytest.raises(AuthenticationError, match="not the one pinned"),
    ):
        c.connect()


def test_only_the_owning_key_can_take_over_a_session(
    tmp_path: Path, keysets: dict[str, Path]
) -> None:
    a, b = keysets["a"], keysets["b"]
    server_dir = tmp_path / "server"
    shutil.copytree(a, server_dir)
    shutil.copy2(b / "trainer.key", server_dir / "authorized" / "other.key")  # both allowed
    other = mixed_keys(tmp_path, trainer_from=b, producer_from=a)
    spec = DataSpec.from_config(load_config(None, ["batch_size=2"]))
    feed = FeedConfig(keys_dir=str(server_dir), exit_on_bye=False)
    with (
        FakeProducer(f"tcp://127.0.0.1:{free_port()}", spec=spec, feed=feed) as fp,
        FeedClient(fp.endpoint, rank=0, spec=spec, keys_dir=a, timeout_s=10) as owner,
    ):
        owner.connect()
        with (
            FeedClient(fp.endpoint, rank=0, spec=spec, keys_dir=other, timeout_s=10) as c,
            pytest.raises(RemoteError, match="belongs to another client key"),
        ):
            c.connect()
        cycle = owner.next_cycle()
        assert cycle.index == 0  # undisturbed
        assert sum(1 for _ in cycle) == cycle.num_batches
        owner.close()  # goodbye: the session ends
        with FeedClient(fp.endpoint, rank=0, spec=spec, keys_dir=other, timeout_s=10) as c:
            assert c.next_cycle().index == 0  # another allowlisted key starts the next session


# --------------------------------------------------------------------------- refusals


def test_refusals_on_unauthenticated_tcp_name_fields_not_values() -> None:
    ours = DataSpec.from_config(load_config(None, ["batch_size=2", "dataset.path=/secret/corpus"]))
    theirs = DataSpec.from_config(load_config(None, ["batch_size=4", "dataset.path=guess"]))
    with FakeProducer("tcp://127.0.0.1:0", spec=ours) as fp:
        with (
            FeedClient(fp.endpoint, rank=0, spec=theirs, timeout_s=10) as c,
            pytest.raises(RemoteError) as exc_info,
        ):
            c.connect()
        text = str(exc_info.value)
        assert "differ in: dataset, batch_size" in text
        assert "/secret/corpus" not in text
        assert ": 2" not in text
        wider = dataclasses.replace(ours, world_size=3)
        with (
            FeedClient(fp.endpoint, rank=0, spec=wider, timeout_s=10) as c,
            pytest.raises(RemoteError) as exc_info,
        ):
            c.connect()
        assert "world_size differs (trainer: 3)" in str(exc_info.value)


def test_refusals_on_private_ipc_name_both_values(tmp_path: Path) -> None:
    ours = DataSpec.from_config(load_config(None, ["batch_size=2"]))
    theirs = DataSpec.from_config(load_config(None, ["batch_size=4"]))
    with (
        FakeProducer(f"ipc://{tmp_path}/p.sock", spec=ours) as fp,
        FeedClient(fp.endpoint, rank=0, spec=theirs, timeout_s=10) as c,
        pytest.raises(RemoteError, match="batch_size: 4 vs 2"),
    ):
        c.connect()


def test_a_start_up_error_tells_an_unauthenticated_peer_only_its_code(
    procs, tmp_path: Path
) -> None:
    port = free_port()
    args = producer_args(tmp_path, f"tcp://127.0.0.1:{port}", "feed.error_linger_s=30")
    args = [a for a in args if not a.startswith("dataset.path=")] + [
        f"dataset.path={tmp_path}/secret-missing"
    ]
    procs.start(python_cmd("lensfeed.producer", *args))
    cfg = load_config(None, args[2:])
    with (
        FeedClient.from_config(cfg, 0, timeout_s=30) as c,
        pytest.raises(RemoteError) as exc_info,
    ):
        c.connect()
    assert exc_info.value.code == "shard"
    assert "failed at start (shard)" in str(exc_info.value)
    assert "secret-missing" not in str(exc_info.value)


def test_the_protocol_never_names_a_value_it_got_in_full() -> None:
    assert P.describe("x" * 1000).endswith("(1002 chars)")
    assert P.describe([[1]] * 5) == "a list of 5"
