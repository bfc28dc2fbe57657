"""Who may talk to whom: CURVE keys (authenticated, encrypted tcp) and private ipc directories.

Built on pyzmq's CURVE support and its certificate files (``zmq.auth``); no crypto of our own.
``lensfeed keys DIR`` writes one key set (:func:`create_keys`)::

    DIR/producer.key          producer public key   -> every trainer host (pins the producer)
    DIR/producer.key_secret   producer secret key   -> producer hosts only
    DIR/trainer.key           trainer public key
    DIR/trainer.key_secret    trainer secret key    -> trainer hosts only
    DIR/authorized/*.key      client keys a producer accepts (the ZAP allowlist)

``feed.keys_dir`` names DIR on both sides; each side reads only the files it needs.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth

from lensfeed.common.errors import ConfigError

SERVER, CLIENT, AUTHORIZED = "producer", "trainer", "authorized"
#: The ZAP domain of every lensfeed CURVE server (the allowlist is configured for it).
ZAP_DOMAIN = "lensfeed"


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE material: its own key pair, plus the producer's public key (a client
    pins it) or the allowlist directory (a producer's ZAP handler reads it)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    authorized: Path | None = None


def create_keys(directory: str | Path, *, force: bool = False) -> list[Path]:
    """Write a producer and a trainer key pair and the allowlist into ``directory`` (0700,
    secret files 0600). Refuses to overwrite an existing key set unless ``force``."""
    d = Path(directory)
    if not force and any((d / f"{n}.key_secret").exists() for n in (SERVER, CLIENT)):
        raise ConfigError(f"{d} already holds keys; pass --force to replace them")
    (d / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    written: list[Path] = []
    for name in (SERVER, CLIENT):
        public, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    allowed = d / AUTHORIZED / f"{CLIENT}.key"
    shutil.copyfile(d / f"{CLIENT}.key", allowed)
    written.append(allowed)
    return written


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise ConfigError(f"CURVE key file {path} not found (create a key set: lensfeed keys DIR)")
    if secret and os.stat(path).st_mode & 0o077:
        raise ConfigError(f"CURVE secret key {path} is readable by other users; chmod 600 {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"CURVE key file {path} is not a key certificate: {exc}") from None
    if secret and not secret_key:
        raise ConfigError(f"CURVE key file {path} holds no secret key")
    return public, secret_key


def server_keys(directory: str | Path) -> CurveKeys:
    """A producer's keys: its key pair and the allowlist of trainer keys."""
    d = Path(directory)
    public, secret = _load(d / f"{SERVER}.key_secret", secret=True)
    authorized = d / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise ConfigError(f"{authorized} holds no client keys (*.key): no trainer could connect")
    assert secret is not None
    return CurveKeys(public, secret, authorized=authorized)


def client_keys(directory: str | Path) -> CurveKeys:
    """A trainer's keys: its key pair and the producer's public key, which it pins."""
    d = Path(directory)
    public, secret = _load(d / f"{CLIENT}.key_secret", secret=True)
    server_public, _ = _load(d / f"{SERVER}.key", secret=False)
    assert secret is not None
    return CurveKeys(public, secret, server_public=server_public)


def apply_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server; set before bind. ZAP (the allowlist) must be running."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN.encode()


def apply_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client that accepts only the pinned producer key; before connect."""
    assert keys.server_public is not None
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.server_public


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc and for tcp on a loopback address (127.0.0.0/8, ::1, localhost)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface: reachable from elsewhere


def check_ipc_dir(endpoint: str, *, create: bool) -> None:
    """An ipc socket's directory must be private (owned by this user, mode 0700): anyone who
    can open it can talk to the socket. ``create`` makes it (0700) when missing."""
    if not endpoint.startswith("ipc://"):
        return
    d = Path(endpoint[len("ipc://") :]).parent
    if create and not d.exists():
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not d.exists():
        return  # the producer creates it; the client connects once it is there
    st = os.stat(d)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(
            f"ipc directory {d} of {endpoint} must be private to this user (owner uid "
            f"{os.getuid()}, mode 0700; it is uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):o}): other users could connect to the feed. "
            f"Use a private directory or chmod 700 {d}"
        )


__all__ = [
    "ZAP_DOMAIN",
    "CurveKeys",
    "apply_client",
    "apply_server",
    "check_ipc_dir",
    "client_keys",
    "create_keys",
    "is_loopback",
    "server_keys",
]
