"""Who may talk to whom over tcp: CurveZMQ (authenticated, encrypted) on the sockets, the ZAP
allowlist, and which endpoints are loopback. The key files themselves are
:mod:`lensfeed.common.keyfiles`; ipc sockets are protected by their directory
(:mod:`lensfeed.common.ipc`).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import zmq
from zmq.auth.base import Authenticator

from lensfeed.common.errors import ConfigError
from lensfeed.common.keyfiles import CurveKeys

#: The ZAP domain of every lensfeed CURVE server (the allowlist is configured for it).
ZAP_DOMAIN = "lensfeed"


class _Allowlist:
    """pyzmq's credentials provider: admits exactly the keys given."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def configure_zap(auth: Authenticator, keys: CurveKeys) -> None:
    """Make ``auth`` (a running pyzmq Authenticator) admit exactly ``keys.allowed``: the set
    :func:`~lensfeed.common.keyfiles.server_keys` checked, not a second read of the directory
    (pyzmq's ``configure_curve(location=...)`` logs a file it cannot read and then denies
    everyone)."""
    if not keys.allowed:
        raise ConfigError("no client keys to allow: load them with server_keys(DIR)")
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_Allowlist(keys.allowed))


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


__all__ = ["ZAP_DOMAIN", "apply_client", "apply_server", "configure_zap", "is_loopback"]
