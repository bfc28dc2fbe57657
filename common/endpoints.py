"""Where rank r's producer listens and its trainer connects, on one node or many.

``feed.endpoint`` (and ``feed.bind``) are templates with these placeholders, so one line covers
a cluster; Python format specs work (``{rank:04d}``):

* ``{rank}``: the global rank;
* ``{node_rank}``, ``{local_rank}``: ``rank // feed.ranks_per_node`` and ``rank %`` it (the
  node that runs the rank's producer, and the rank's place on it; ``ranks_per_node`` 0 = one
  node holds every rank);
* ``{host}``: ``feed.hosts[node_rank]``, the producer host of the rank;
* ``{port}``: ``feed.base_port + rank``, unique across the cluster.

Or list one endpoint per rank (``feed.endpoints``, or ``feed.endpoints_file`` with one per
line). :func:`validate` computes every rank's endpoint before anything starts and rejects gaps,
unknown placeholders, two ranks on one endpoint (tcp: anywhere; ipc: on one node), IPv6 (not
supported) and ipc paths whose directory cannot protect the socket (abstract ``ipc://@NAME``,
relative).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lensfeed.common.errors import ConfigError

if TYPE_CHECKING:
    from lensfeed.common.config import FeedConfig

PLACEHOLDERS = ("rank", "node_rank", "local_rank", "host", "port")
SCHEMES = ("ipc://", "tcp://", "inproc://")


def placement(feed: FeedConfig, world_size: int, rank: int) -> dict[str, Any]:
    """The values of every placeholder for ``rank``."""
    per = feed.ranks_per_node or world_size
    node = rank // per
    return {
        "rank": rank,
        "node_rank": node,
        "local_rank": rank % per,
        "host": feed.hosts[node] if node < len(feed.hosts) else "",
        "port": feed.base_port + rank,
    }


def listed(feed: FeedConfig) -> list[str]:
    """The explicit per-rank endpoints (``feed.endpoints`` or ``feed.endpoints_file``), if any."""
    if feed.endpoints:
        return [str(e) for e in feed.endpoints]
    if feed.endpoints_file:
        path = Path(feed.endpoints_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"'feed.endpoints_file' {path} cannot be read: {exc}") from None
        return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return []


def endpoint_for(feed: FeedConfig, world_size: int, rank: int) -> str:
    """Where rank ``rank``'s trainer connects."""
    explicit = listed(feed)
    if explicit:
        return explicit[rank]
    return feed.endpoint.format(**placement(feed, world_size, rank))


def bind_for(feed: FeedConfig, world_size: int, rank: int) -> str:
    """Where producer ``rank`` binds: ``feed.bind``, else its endpoint with any tcp host
    replaced by 127.0.0.1 (loopback unless a bind address is configured)."""
    if feed.bind:
        return feed.bind.format(**placement(feed, world_size, rank))
    endpoint = endpoint_for(feed, world_size, rank)
    if endpoint.startswith("tcp://"):
        return f"tcp://127.0.0.1:{endpoint.rsplit(':', 1)[-1]}"
    return endpoint


def _names(key: str, template: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise ConfigError(f"'{key}' is not a valid template (got {template!r}: {exc})") from None
    unknown = names - set(PLACEHOLDERS)
    if unknown:
        raise ConfigError(
            f"'{key}' uses unknown placeholder(s) {sorted(unknown)} (got {template!r}); "
            f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
        )
    return names


#: Longest ipc path libzmq can bind or connect to (a Unix socket's ``sun_path`` less its NUL).
MAX_IPC_PATH_BYTES = 107


def ipc_path_problem(path: str) -> str:
    """What makes ipc ``path`` unsafe or unusable ("" if nothing). A socket's only protection
    is its directory's permissions (:func:`lensfeed.common.ipc.check_ipc_dir`), so the path
    must have a directory that can be checked: absolute, and not in the abstract namespace."""
    if path.startswith("@"):
        return (
            "is an abstract socket (ipc://@NAME): it has no file permissions, so any local user "
            "could connect to it; use a path in a private directory (ipc:///DIR/NAME.sock)"
        )
    if not path.startswith("/"):
        return (
            "has a relative path; an ipc path must be absolute (ipc:///DIR/NAME.sock): a "
            "relative one depends on each process's working directory"
        )
    if len(path.encode()) > MAX_IPC_PATH_BYTES:
        return (
            f"has a {len(path.encode())}-byte path; an ipc socket path has at most "
            f"{MAX_IPC_PATH_BYTES} bytes (use a shorter directory, e.g. under /tmp)"
        )
    return ""


def _form_problem(endpoint: str) -> str:
    """What is wrong with ``endpoint``'s form ("" if nothing), checked here so that libzmq never
    refuses it later, inside a running producer or client."""
    if not endpoint.startswith(SCHEMES):
        return "must start with ipc://, tcp:// or inproc://"
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            return "must be tcp://HOST:PORT"
        if host.startswith("[") or ":" in host:
            # libzmq would need ZMQ_IPV6 on both sockets, and a bind defaults to 127.0.0.1.
            return "names an IPv6 address: IPv6 is not supported; use an IPv4 address or hostname"
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"has port {port!r}; a tcp port is a number in 1-65535"
    elif not rest:
        return f"names no {'path' if scheme == 'ipc' else 'name'}"
    elif scheme == "ipc":
        return ipc_path_problem(rest)
    return ""


def validate(feed: FeedConfig, world_size: int) -> None:
    """Every rank's endpoint, computed and checked before anything starts."""
    if feed.ranks_per_node < 0:
        raise ConfigError(f"'feed.ranks_per_node' must be >= 0 (got {feed.ranks_per_node})")
    used = _names("feed.endpoint", feed.endpoint) | _names("feed.bind", feed.bind)
    per = feed.ranks_per_node or world_size
    nodes = -(-world_size // per)
    if "host" in used and len(feed.hosts) < nodes:
        raise ConfigError(
            f"'feed.hosts' names {len(feed.hosts)} host(s) but {{host}} needs one per node: "
            f"{world_size} ranks / feed.ranks_per_node={per} = {nodes} node(s)"
        )
    if "port" in used and not (feed.base_port > 0 and feed.base_port + world_size - 1 <= 65535):
        raise ConfigError(
            f"'feed.base_port' {feed.base_port} + ranks must stay within 1-65535 "
            f"(world_size {world_size})"
        )
    explicit = listed(feed)
    if explicit and len(explicit) != world_size:
        where = "feed.endpoints" if feed.endpoints else f"feed.endpoints_file {feed.endpoints_file}"
        raise ConfigError(
            f"'{where}' lists {len(explicit)} endpoint(s) for world_size {world_size}: one per "
            "rank, in rank order"
        )
    seen: dict[tuple[int, str], int] = {}
    bound: dict[tuple[int, str], int] = {}
    for rank in range(world_size):
        try:
            endpoint = endpoint_for(feed, world_size, rank)
            bind = bind_for(feed, world_size, rank)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"'feed.endpoint' cannot be filled in for rank {rank}: {exc}"
            ) from None
        for key, ep in (("endpoint", endpoint), ("bind", bind)):
            problem = _form_problem(ep)
            if problem:
                raise ConfigError(f"rank {rank}'s {key} {ep!r} {problem}")
        # tcp names one place on the network; an ipc path is per node.
        node = -1 if endpoint.startswith("tcp://") else rank // per
        other = seen.setdefault((node, endpoint), rank)
        if other != rank:
            raise ConfigError(
                f"ranks {other} and {rank} would share the endpoint {endpoint!r}: give every rank "
                "its own (e.g. {rank} or {port} in feed.endpoint, or one line per rank in "
                "feed.endpoints)"
            )
        # Producers reached at one host (tcp) or on one node (ipc) bind there: two binds alike
        # would collide at start.
        host = endpoint.rpartition(":")[0] if endpoint.startswith("tcp://") else rank // per
        other = bound.setdefault((host, bind), rank)
        if other != rank:
            raise ConfigError(
                f"ranks {other} and {rank} would bind the same address {bind!r} on one host: "
                "give feed.bind a per-rank port (e.g. tcp://0.0.0.0:{port})"
            )


__all__ = [
    "MAX_IPC_PATH_BYTES",
    "PLACEHOLDERS",
    "bind_for",
    "endpoint_for",
    "ipc_path_problem",
    "listed",
    "placement",
    "validate",
]
