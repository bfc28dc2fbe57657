"""CURVE key sets on disk: writing one (``lensfeed keys DIR``) and reading each side's half.

Built on pyzmq's certificate file format (``zmq.auth``); no crypto of our own. One key set
(:func:`create_keys`)::

    DIR/producer.key          producer public key   -> every trainer host (pins the producer)
    DIR/producer.key_secret   producer secret key   -> producer hosts only
    DIR/trainer.key           trainer public key
    DIR/trainer.key_secret    trainer secret key    -> trainer hosts only
    DIR/authorized/*.key      client keys a producer accepts (the ZAP allowlist)

``feed.keys_dir`` names DIR on both sides; each side reads only the files it needs. Whoever can
write DIR, ``authorized/`` or a key file could swap in a key of theirs, so every one of them
must be a real file or directory (no symlink), owned by this user or root and writable by its
owner only; secret files must not be readable by others either. Files are opened once and
checked on the open descriptor, so a swap between check and use changes nothing. How the keys
are applied to sockets is :mod:`lensfeed.common.curve`.
"""

from __future__ import annotations

import datetime
import errno
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils import z85

from lensfeed.common.errors import ConfigError

SERVER, CLIENT, AUTHORIZED = "producer", "trainer", "authorized"
#: A CURVE key in a certificate file: 32 bytes as 40 Z85 characters.
KEY_CHARS = 40
#: More than any certificate file (a few hundred bytes): a bigger one is refused, not read.
MAX_KEY_FILE_BYTES = 64 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO named *.key must not block the open; fstat refuses it right after.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE material: its own key pair, plus the producer's public key (a client
    pins it) or the validated allowlist of client keys (a producer's ZAP handler admits them)."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback's locals
    server_public: bytes | None = None
    authorized: Path | None = None
    #: The Z85 public keys read from ``authorized/*.key``, each file checked.
    allowed: frozenset[bytes] = frozenset()


# --------------------------------------------------------------------------- creating


def _banner(kind: str) -> str:
    return (
        f"#   ****  Generated on {datetime.datetime.now()} by lensfeed keys  ****\n"
        f"#   ZeroMQ CURVE {kind} Certificate\n\n"
    )


def _certificate(public: bytes, secret: bytes | None = None) -> bytes:
    """The ZPL text ``zmq.auth.create_certificates`` writes (``zmq.auth.load_certificate``
    reads it): a banner, an empty ``metadata`` section and the ``curve`` section."""
    text = _banner("**Secret**" if secret else "Public") + "metadata\ncurve\n"
    text += f'    public-key = "{public.decode()}"\n'
    if secret:
        text += f'    secret-key = "{secret.decode()}"\n'
    return text.encode()


def _sealed(fd: int) -> bool:
    """Whether the directory open at ``fd`` is this user's and closed to everyone else (no
    group or other bits): then nobody else can reach what is inside, whatever its modes (a key
    set made by an older ``lensfeed keys`` under umask 002 has 0775/0664 entries in a 0700
    directory)."""
    st = os.fstat(fd)
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _private_dir(path: Path, fd: int, *, mine: bool) -> None:
    """Refuse the directory open at ``fd`` unless its owner is this user (or root, unless
    ``mine``) and only the owner can write it: whoever else can write it can add or swap keys."""
    st = os.fstat(fd)
    owners = (os.geteuid(),) if mine else (os.geteuid(), 0)
    if st.st_uid not in owners:
        who = "this user" if mine else "this user or root"
        raise ConfigError(
            f"CURVE keys directory {path} is owned by uid {st.st_uid}, not {who}: its owner "
            "could swap the keys. Use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise ConfigError(
            f"CURVE keys directory {path} is writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):o}): they could add or swap keys. chmod go-w {path}, "
            "or use a private directory"
        )


def _open_dir(
    path: Path, *, dir_fd: int | None = None, mine: bool = False, sealed: bool = False
) -> int:
    """An fd on directory ``path`` (the last part of it relative to ``dir_fd`` if given),
    refused unless it is a real directory (no symlink) that only a trusted owner can write,
    or one inside a ``sealed`` directory (:func:`_sealed`), which nobody else can reach."""
    try:
        fd = os.open(path.name if dir_fd is not None else path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise ConfigError(_open_problem(path, "keys directory", exc)) from None
    try:
        if not sealed:
            _private_dir(path, fd, mine=mine)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_problem(path: Path, what: str, exc: OSError) -> str:
    """Why ``path`` could not be opened, in words (a symlink is refused by O_NOFOLLOW)."""
    if exc.errno == errno.ENOENT:
        return f"CURVE {what} {path} not found (create a key set: lensfeed keys DIR)"
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        return (
            f"CURVE {what} {path} is a symbolic link; lensfeed reads keys only from real "
            "files and directories (whoever can change the link could swap the keys): copy "
            "the target there instead"
        )
    if exc.errno == errno.ENOTDIR:
        return f"CURVE {what} {path} is not a directory"
    return f"CURVE {what} {path} cannot be opened: {exc.strerror}"


def create_keys(directory: str | Path, *, force: bool = False) -> list[Path]:
    """Write a producer and a trainer key pair and the allowlist into ``directory``.

    A missing directory is created 0700. An existing one must be a real directory of this
    user that others cannot write: it is refused, never chmod'ed (it may be someone else's,
    or a shared project directory). Every file is created here with its final mode (secret
    0600, public 0644) and O_EXCL|O_NOFOLLOW, so a secret is never readable by others and a
    symlink planted at a file's name is never followed. Refuses to touch an existing key set
    unless ``force``, which replaces these five files (the names, not what a symlink points at).
    """
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    dfd = _open_dir(d, mine=True)
    try:
        try:
            os.mkdir(AUTHORIZED, 0o700, dir_fd=dfd)
        except FileExistsError:
            pass
        afd = _open_dir(d / AUTHORIZED, dir_fd=dfd, mine=True, sealed=_sealed(dfd))
        try:
            return _write_key_set(d, dfd, afd, force=force)
        finally:
            os.close(afd)
    finally:
        os.close(dfd)


def _write_key_set(d: Path, dfd: int, afd: int, *, force: bool) -> list[Path]:
    pairs = {name: zmq.curve_keypair() for name in (SERVER, CLIENT)}
    files: list[tuple[int, Path, bytes, int]] = []  # (dir fd, path, contents, mode)
    for name, (public, secret) in pairs.items():
        files.append((dfd, d / f"{name}.key", _certificate(public), 0o644))
        files.append((dfd, d / f"{name}.key_secret", _certificate(public, secret), 0o600))
    files.append((afd, d / AUTHORIZED / f"{CLIENT}.key", _certificate(pairs[CLIENT][0]), 0o644))
    present = [(fd, p) for fd, p, _, _ in files if _lexists(p.name, fd)]
    if present and not force:
        raise ConfigError(f"{d} already holds keys; pass --force to replace them")
    for fd, path in present:
        try:
            os.unlink(path.name, dir_fd=fd)  # a symlink itself, never its target
        except OSError as exc:
            raise ConfigError(f"cannot replace {path}: {exc.strerror}") from None
    written: list[tuple[int, Path]] = []
    try:
        for fd, path, contents, mode in files:
            try:
                out = os.open(path.name, _CREATE_FLAGS, mode, dir_fd=fd)
            except FileExistsError:  # created since the check above: someone else is here
                raise ConfigError(f"{path} appeared while the keys were written") from None
            written.append((fd, path))
            with os.fdopen(out, "wb") as f:
                f.write(contents)
    except BaseException:
        for fd, path in written:  # no half key set left behind
            try:
                os.unlink(path.name, dir_fd=fd)
            except OSError:
                pass
        raise
    return [path for _, path in written]


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- loading


def _parse(data: bytes) -> tuple[bytes | None, bytes | None]:
    """``zmq.auth.load_certificate``'s reading of a certificate, on bytes already read."""
    public = secret = None
    for raw in data.split(b"\n"):
        line = raw.strip()
        if line.startswith(b"#"):
            continue
        if line.startswith((b"public-key", b"secret-key")):
            value = line.partition(b"=")[2].strip(b" \t'\"")
            if line.startswith(b"public-key"):
                public = value
            else:
                secret = value
        if public and secret:
            break
    return public, secret


def _valid_key(value: bytes) -> bool:
    """40 Z85 characters that decode to 32 bytes: what libzmq's CURVE options accept."""
    if len(value) != KEY_CHARS:
        return False
    try:
        return len(z85.decode(value)) == 32
    except (ValueError, KeyError, struct.error):  # a non-Z85 byte, or a group over 2**32
        return False


def _read_key(
    dir_fd: int, path: Path, *, secret: bool, sealed: bool = False
) -> tuple[bytes, bytes | None]:
    """The (public, secret) keys of certificate ``path`` in the directory open at ``dir_fd``,
    every problem a ConfigError naming the file (libzmq would only say 'Invalid argument' at
    connect, and pyzmq's authenticator would deny every client)."""
    what = "secret key file" if secret else "key file"
    try:
        fd = os.open(path.name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise ConfigError(_open_problem(path, what, exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"CURVE {what} {path} is not a regular file")
        if not sealed and st.st_uid not in (os.geteuid(), 0):
            raise ConfigError(
                f"CURVE {what} {path} is owned by uid {st.st_uid}, not this user or root: its "
                "owner could swap the key"
            )
        if secret and st.st_mode & 0o077:
            raise ConfigError(
                f"CURVE secret key {path} is readable by other users; chmod 600 {path}"
            )
        if not sealed and st.st_mode & 0o022:
            raise ConfigError(
                f"CURVE {what} {path} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}): they could swap the key; chmod go-w {path}"
            )
        data = b""
        while len(data) <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, 1 << 16)):
            data += chunk
    except OSError as exc:
        raise ConfigError(f"CURVE {what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"CURVE {what} {path} is over {MAX_KEY_FILE_BYTES} bytes: not a key")
    public, secret_key = _parse(data)
    if not public:
        raise ConfigError(
            f"CURVE {what} {path} is not a key certificate: it holds no public key (no "
            "public-key line; create a key set: lensfeed keys DIR)"
        )
    for kind, key in (("public", public), ("secret", secret_key)):
        if key is not None and not _valid_key(key):
            raise ConfigError(
                f"CURVE {what} {path} holds a malformed {kind} key ({len(key)} characters; a "
                f"key is {KEY_CHARS} Z85 characters): the file is damaged or truncated"
            )
    if secret:
        if not secret_key:
            raise ConfigError(f"CURVE key file {path} holds no secret key")
        if zmq.curve_public(secret_key) != public:
            raise ConfigError(
                f"CURVE secret key file {path}: its public key does not belong to its secret "
                "key (the file was edited); create a new key set with lensfeed keys DIR"
            )
    return public, secret_key


def server_keys(directory: str | Path) -> CurveKeys:
    """A producer's keys: its key pair and the allowlist of trainer keys, every file checked
    here (one that pyzmq cannot read would make its authenticator deny every client)."""
    d = Path(directory)
    authorized = d / AUTHORIZED
    dfd = _open_dir(d)
    try:
        sealed = _sealed(dfd)
        public, secret = _read_key(dfd, d / f"{SERVER}.key_secret", secret=True, sealed=sealed)
        afd = _open_dir(authorized, dir_fd=dfd, sealed=sealed)
        try:
            # pyzmq's glob("*.key"): hidden files are not keys.
            names = sorted(n for n in os.listdir(afd) if n.endswith(".key") and n[0] != ".")
            allowed = frozenset(
                _read_key(afd, authorized / n, secret=False, sealed=sealed)[0] for n in names
            )
        finally:
            os.close(afd)
    finally:
        os.close(dfd)
    if not allowed:
        raise ConfigError(f"{authorized} holds no client keys (*.key): no trainer could connect")
    assert secret is not None
    return CurveKeys(public, secret, authorized=authorized, allowed=allowed)


def client_keys(directory: str | Path) -> CurveKeys:
    """A trainer's keys: its key pair and the producer's public key, which it pins."""
    d = Path(directory)
    dfd = _open_dir(d)
    try:
        sealed = _sealed(dfd)
        public, secret = _read_key(dfd, d / f"{CLIENT}.key_secret", secret=True, sealed=sealed)
        server_public, _ = _read_key(dfd, d / f"{SERVER}.key", secret=False, sealed=sealed)
    finally:
        os.close(dfd)
    assert secret is not None
    return CurveKeys(public, secret, server_public=server_public)


__all__ = [
    "AUTHORIZED",
    "CLIENT",
    "SERVER",
    "CurveKeys",
    "client_keys",
    "create_keys",
    "server_keys",
]
