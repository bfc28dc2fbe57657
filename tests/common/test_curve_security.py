"""What a local user other than us could do to a key set or an ipc directory, and the refusals
that stop it: key files and directories others can write or own, symlinks, unreadable or
malformed keys (named by file, not blamed on the endpoint), ``lensfeed keys`` in a directory
it must not touch, and ipc directories that are missing, symlinked or vanish mid-check.

Tests run as root or as any user: another user is uid 65534 (``os.chown``), which needs root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lensfeed.common.config import FeedConfig
from lensfeed.common.curve import configure_zap
from lensfeed.common.errors import ConfigError
from lensfeed.common.ipc import check_ipc_dir
from lensfeed.common.keyfiles import client_keys, create_keys, server_keys
from lensfeed.keys import main as keys_main
from lensfeed.producer.listener import Listener
from lensfeed.trainer.connection import Connection
from tests._util import free_port

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    d = tmp_path / "k"
    create_keys(d)
    return d


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.term()


# --------------------------------------------------------------------------- lensfeed keys DIR


def test_keys_written_by_us_are_pyzmq_certificates_with_private_secrets(keys: Path) -> None:
    for name in ("producer", "trainer"):
        public, secret = zmq.auth.load_certificate(keys / f"{name}.key_secret")
        assert secret is not None
        assert zmq.curve_public(secret) == public
        assert zmq.auth.load_certificate(keys / f"{name}.key") == (public, None)
        assert mode(keys / f"{name}.key_secret") == 0o600
        assert mode(keys / f"{name}.key") == 0o644
    trainer_public, _ = zmq.auth.load_certificate(keys / "trainer.key")
    assert zmq.auth.load_certificates(keys / "authorized") == {trainer_public: True}
    assert mode(keys) == 0o700


def test_keys_leave_an_existing_directory_of_ours_as_it_is(tmp_path: Path) -> None:
    d = tmp_path / "project"
    d.mkdir()
    os.chmod(d, 0o755)
    create_keys(d)
    assert mode(d) == 0o755  # not chmod'ed to 0700 behind our back; the secrets are 0600
    assert mode(d / "trainer.key_secret") == 0o600
    assert server_keys(d).allowed
    assert client_keys(d).server_public


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        pytest.param(lambda d: os.chown(d, NOBODY, NOBODY), "owned by uid 65534", marks=as_root),
        (lambda d: os.chmod(d, 0o775), "writable by other users (mode 775)"),
        (lambda d: os.chmod(d, 0o757), "writable by other users (mode 757)"),
    ],
)
def test_keys_refuse_a_directory_others_own_or_can_write(
    tmp_path: Path, setup: Callable[[Path], None], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    setup(d)
    before = os.lstat(d)
    assert keys_main([str(d)]) == 1
    assert needle in capsys.readouterr().err
    after = os.lstat(d)
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)  # never chmod'ed
    assert os.listdir(d) == []


def test_keys_refuse_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        create_keys(tmp_path / "link")
    assert os.listdir(real) == []


def test_keys_never_follow_a_symlink_planted_at_a_file_name(tmp_path: Path) -> None:
    d = tmp_path / "k"
    d.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    (d / "producer.key_secret").symlink_to(elsewhere)  # dangling: .exists() is False
    with pytest.raises(ConfigError, match="already holds keys; pass --force"):
        create_keys(d)
    assert not elsewhere.exists()
    create_keys(d, force=True)  # replaces the link itself, never writes through it
    assert not elsewhere.exists()
    assert stat.S_ISREG(os.lstat(d / "producer.key_secret").st_mode)
    assert mode(d / "producer.key_secret") == 0o600


def test_keys_refuse_to_overwrite_any_key_file_without_force(keys: Path) -> None:
    for name in ("producer.key_secret", "trainer.key_secret", "producer.key"):
        (keys / name).unlink()
    before = (keys / "authorized" / "trainer.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds keys"):
        create_keys(keys)
    assert (keys / "authorized" / "trainer.key").read_bytes() == before


def test_key_files_get_their_mode_when_they_are_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No chmod after writing: a secret is never readable by others, even for a moment (an fd
    opened in that moment would keep it), and a permissive umask cannot widen any file."""

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("create_keys must not need a chmod")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "fchmod", no_chmod)
    old = os.umask(0)
    try:
        written = create_keys(tmp_path / "k")
    finally:
        os.umask(old)
    for path in written:
        assert mode(path) == (0o600 if path.name.endswith("_secret") else 0o644), path


# --------------------------------------------------------------------------- the allowlist


def _comment_only(p: Path) -> None:
    p.write_text("# a key will go here\n")


def _directory(p: Path) -> None:
    p.mkdir()


def _dangling_symlink(p: Path) -> None:
    p.symlink_to(p.parent / "gone")


def _symlink_to_a_good_key(p: Path) -> None:
    p.symlink_to(p.parent.parent / "trainer.key")


def _truncated(p: Path) -> None:
    public, _ = zmq.auth.load_certificate(p.parent.parent / "trainer.key")
    p.write_text(f'curve\n    public-key = "{public.decode()[:-3]}"\n')


def _not_z85(p: Path) -> None:
    p.write_text('curve\n    public-key = "' + "~" * 40 + '"\n')


def _fifo(p: Path) -> None:
    os.mkfifo(p)  # pyzmq's open() would block on it forever


@pytest.mark.parametrize(
    "make_bad",
    [
        _comment_only,
        _directory,
        _dangling_symlink,
        _symlink_to_a_good_key,
        _truncated,
        _not_z85,
        _fifo,
    ],
)
def test_one_bad_allowlist_file_is_a_config_error_naming_it(
    keys: Path, make_bad: Callable[[Path], None]
) -> None:
    """pyzmq's authenticator logs such a file and then denies every client, while the producer
    looks healthy and the trainer blames its own key: refuse it at start instead."""
    bad = keys / "authorized" / "x.key"
    make_bad(bad)
    with pytest.raises(ConfigError) as exc_info:
        server_keys(keys)
    assert str(bad) in str(exc_info.value)


def test_a_producer_with_a_bad_allowlist_file_does_not_start(keys: Path, ctx) -> None:
    _comment_only(keys / "authorized" / "x.key")
    feed = FeedConfig(keys_dir=str(keys))
    with pytest.raises(ConfigError, match="x.key is not a key certificate"):
        Listener(ctx, f"tcp://127.0.0.1:{free_port()}", feed).close()


def test_an_empty_allowlist_is_refused(keys: Path) -> None:
    (keys / "authorized" / "trainer.key").unlink()
    (keys / "authorized" / "notes.txt").write_text("not a key\n")
    with pytest.raises(ConfigError, match="holds no client keys"):
        server_keys(keys)


def test_zap_admits_exactly_the_checked_keys(tmp_path: Path, keys: Path, ctx) -> None:
    other = tmp_path / "other"
    create_keys(other)
    hidden = keys / "authorized" / ".hidden.key"  # not a *.key for pyzmq's glob: ignored
    hidden.write_bytes((other / "trainer.key").read_bytes())
    server = server_keys(keys)
    trainer_public, _ = zmq.auth.load_certificate(keys / "trainer.key")
    assert server.allowed == {trainer_public}
    auth = ThreadAuthenticator(ctx)
    auth.start()
    try:
        configure_zap(auth, server)
        rep = ctx.socket(zmq.REP)
        rep.linger = 0
        rep.curve_secretkey, rep.curve_publickey = server.secret, server.public
        rep.curve_server = True
        rep.zap_domain = b"lensfeed"
        port = rep.bind_to_random_port("tcp://127.0.0.1")

        def ask(keys_dir: Path) -> bool:
            c = client_keys(keys_dir)
            req = ctx.socket(zmq.REQ)
            req.linger = 0
            req.curve_secretkey, req.curve_publickey = c.secret, c.public
            req.curve_serverkey = server.public
            req.connect(f"tcp://127.0.0.1:{port}")
            req.send(b"hi")
            answered = bool(rep.poll(1500))
            if answered:
                rep.send(rep.recv())
                assert req.recv() == b"hi"
            req.close()
            return answered

        (other / "producer.key").unlink()
        (other / "producer.key").write_bytes((keys / "producer.key").read_bytes())
        assert ask(keys)
        assert not ask(other)  # a valid key, but not in the allowlist
        rep.close()
    finally:
        auth.stop()


# --------------------------------------------------------------------------- key values


def _replace_key(path: Path, kind: str, value: str) -> None:
    lines = path.read_text().splitlines()
    out = [f'    {kind} = "{value}"' if ln.strip().startswith(kind) else ln for ln in lines]
    path.write_text("\n".join(out) + "\n")


def _key(path: Path, kind: str) -> str:
    public, secret = zmq.auth.load_certificate(path)
    return (public if kind == "public-key" else secret or b"").decode()


@pytest.mark.parametrize(
    ("name", "kind", "edit", "needle"),
    [
        ("producer.key", "public-key", lambda k: k[:-1], "malformed public key (39 characters"),
        ("producer.key", "public-key", lambda k: "~" + k[1:], "malformed public key"),
        ("producer.key", "public-key", lambda k: "#" * 40, "malformed public key"),  # > 2**32
        ("trainer.key_secret", "secret-key", lambda k: k[:-5], "malformed secret key"),
        ("trainer.key_secret", "secret-key", lambda k: k[:-1] + "\\", "malformed secret key"),
        (
            "trainer.key_secret",
            "public-key",
            lambda k: zmq.curve_keypair()[0].decode(),  # a valid key, but another pair's
            "does not belong to its secret",
        ),
    ],
)
def test_a_malformed_key_value_is_blamed_on_its_file(
    keys: Path, name: str, kind: str, edit: Callable[[str], str], needle: str
) -> None:
    """Not on the endpoint: libzmq says only 'Invalid argument' when the socket option is set."""
    path = keys / name
    _replace_key(path, kind, edit(_key(path, kind)))
    with pytest.raises(ConfigError) as exc_info:
        client_keys(keys)
    text = str(exc_info.value)
    assert str(path) in text
    assert needle in text
    assert _key(keys / "trainer.key_secret", "secret-key")[:10] not in text  # no secret echoed


def test_the_secret_key_is_not_in_the_repr(keys: Path) -> None:
    c = client_keys(keys)
    assert c.secret.decode() not in repr(c)
    assert c.public.decode() in repr(c)


# --------------------------------------------------------------------------- who may write keys


def _chmod(mode_: int) -> Callable[[Path], None]:
    return lambda p: os.chmod(p, mode_)


def _give_away(p: Path) -> None:
    os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


def _symlink_copy(p: Path) -> None:
    """``p`` becomes a symlink to an identical file or directory elsewhere."""
    real = p.parent / f"real-{p.name}"
    p.rename(real)
    p.symlink_to(real)


@pytest.mark.parametrize(
    ("target", "change", "needle"),
    [
        (".", _chmod(0o770), "writable by other users (mode 770)"),
        (".", _chmod(0o702), "writable by other users (mode 702)"),
        pytest.param(".", _give_away, "owned by uid 65534", marks=as_root),
        (".", _symlink_copy, "is a symbolic link"),
        ("authorized", _chmod(0o775), "writable by other users (mode 775)"),
        pytest.param("authorized", _give_away, "owned by uid 65534", marks=as_root),
        ("authorized", _symlink_copy, "is a symbolic link"),
        ("authorized/trainer.key", _chmod(0o666), "writable by other users (mode 666)"),
        pytest.param("authorized/trainer.key", _give_away, "owned by uid 65534", marks=as_root),
        ("producer.key", _chmod(0o664), "writable by other users (mode 664)"),
        pytest.param("producer.key", _give_away, "owned by uid 65534", marks=as_root),
        ("producer.key", _symlink_copy, "is a symbolic link"),
        pytest.param("trainer.key_secret", _give_away, "owned by uid 65534", marks=as_root),
        ("trainer.key_secret", _symlink_copy, "is a symbolic link"),
    ],
)
def test_keys_another_user_could_swap_are_refused(
    tmp_path: Path, target: str, change: Callable[[Path], None], needle: str
) -> None:
    """Whoever can write the keys directory, the allowlist or producer.key (pinned by the
    trainer) could let in, or impersonate, anyone: every such path is refused, named."""
    keys = tmp_path / "set" / "k"  # the parent is ours alone: a symlinked copy lands there
    create_keys(keys)
    path = keys if target == "." else keys / target
    if target != ".":
        keys.chmod(0o755)  # others can reach what is inside: its modes and owners matter
    change(path)
    loaders = {".": [client_keys, server_keys], "authorized": [server_keys]}
    for load in loaders.get(target.partition("/")[0], [client_keys]):
        with pytest.raises(ConfigError) as exc_info:
            load(keys)
        text = str(exc_info.value)
        assert str(path) in text, load
        assert needle in text, load


def test_a_key_set_in_a_directory_closed_to_others_loads_whatever_its_entries_modes(
    tmp_path: Path,
) -> None:
    """An older lensfeed keys under umask 002 left authorized/ 0775 and public keys 0664 in a
    0700 directory: nobody else can reach them, so they load as before (the secret files are
    still checked)."""
    keys = tmp_path / "k"
    create_keys(keys)
    (keys / "authorized").chmod(0o775)
    for name in ("producer.key", "trainer.key", "authorized/trainer.key"):
        (keys / name).chmod(0o664)
    assert server_keys(keys).allowed
    assert client_keys(keys).server_public
    create_keys(keys, force=True)  # and lensfeed keys --force replaces it
    (keys / "trainer.key_secret").chmod(0o640)
    with pytest.raises(ConfigError, match="readable by other users"):
        client_keys(keys)


# --------------------------------------------------------------------------- ipc directories


def test_the_trainer_creates_a_missing_ipc_directory_private_before_connecting(
    tmp_path: Path, ctx
) -> None:
    """Else another local user could create it first (under /tmp, say) and listen there."""
    d = tmp_path / "run" / "lensfeed"
    conn = Connection(ctx, f"ipc://{d}/rank0.sock", heartbeat_s=0)
    conn.close()
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode)
    assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    other = tmp_path / "other"
    check_ipc_dir(f"ipc://{other}/r0.sock")  # whatever a caller asks
    assert mode(other) == 0o700


def _ipc_symlink(d: Path) -> None:
    real = d.parent / "real"
    real.mkdir(mode=0o700)
    d.symlink_to(real)


def _ipc_not_a_dir(d: Path) -> None:
    d.write_text("")


def _ipc_someone_elses(d: Path) -> None:
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_ipc_symlink, "is a symbolic link"),
        (_ipc_not_a_dir, "is not a directory"),
        pytest.param(_ipc_someone_elses, "must be private to this user", marks=as_root),
    ],
)
def test_an_ipc_directory_we_cannot_trust_is_refused_on_both_sides(
    tmp_path: Path, ctx, make: Callable[[Path], None], needle: str
) -> None:
    d = tmp_path / "run"
    make(d)
    endpoint = f"ipc://{d}/r0.sock"
    with pytest.raises(ConfigError, match=needle):
        check_ipc_dir(endpoint)
    with pytest.raises(ConfigError, match=needle):
        Connection(ctx, endpoint, heartbeat_s=0)


def test_an_ipc_directory_that_vanishes_mid_check_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    real_stat, real_lstat = os.stat, os.lstat

    def gone(real):
        def stat_(path, *args, **kwargs):
            if os.fspath(path) == str(d):
                raise FileNotFoundError(2, "No such file or directory", str(d))
            return real(path, *args, **kwargs)

        return stat_

    monkeypatch.setattr(os, "stat", gone(real_stat))
    monkeypatch.setattr(os, "lstat", gone(real_lstat))
    with pytest.raises(ConfigError, match="cannot be checked"):
        check_ipc_dir(f"ipc://{d}/r0.sock")


@pytest.mark.parametrize(
    ("endpoint", "needle"),
    [
        ("ipc://@lensfeed-rank0", "is an abstract socket"),
        ("ipc://run/rank0.sock", "an ipc path must be absolute"),
    ],
)
def test_ipc_endpoints_without_a_checkable_directory_are_refused(
    ctx, endpoint: str, needle: str
) -> None:
    """Given straight to a socket (no config validation) too."""
    with pytest.raises(ConfigError, match=needle):
        check_ipc_dir(endpoint)
    with pytest.raises(ConfigError, match=needle):
        Connection(ctx, endpoint, heartbeat_s=0)
