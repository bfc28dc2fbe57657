"""Simulated hosts for multi-host tests and benchmarks: Linux network namespaces on one switch.

Each host is a network namespace with ``lo`` up and one interface ``eth0`` (a veth pair) whose
other end is a port of a bridge. The bridge lives in a namespace of its own, not in the root
namespace, so a test adds no interface, address or route to the machine it runs on, its subnet
cannot clash with a real one, and deleting the namespaces removes every link with them.
The namespaces share the filesystem, the process table and ``/tmp`` with the test; only the
network is private (so a tcp port is free in every fresh host, and ``ipc://`` sockets of
different hosts must live in different directories).

Needs root (``CAP_SYS_ADMIN``, ``CAP_NET_ADMIN``) and the ``ip`` binary of iproute2;
:class:`Unavailable` says why not, for a ``pytest.skip``.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: A private /24 the hosts live in; it exists only inside the namespaces made here.
SUBNET = "10.231.117"
#: Device name of every host's link to the switch (what ``GLOO_SOCKET_IFNAME`` must name).
IFNAME = "eth0"

_PROBE = """
import socket, sys
for ip in sys.argv[1:]:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((ip, 9))  # the discard port: nobody listens, so the peer's kernel resets
    except ConnectionRefusedError:
        pass  # the SYN got there and the RST came back: the path works both ways
    except OSError as exc:
        sys.exit(f"{ip}: {exc}")
    finally:
        s.close()
"""


def sweep_stale() -> None:
    """Delete the namespaces of runs that died before their cleanup (SIGKILL): names
    ``lf-NAME-PID`` whose PID no longer exists. Live runs' namespaces are left alone."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"(lf-\w+-(\d+))( .*)?", line.strip())
        if m and not Path(f"/proc/{m[2]}").exists():
            subprocess.run(["ip", "netns", "del", m[1]], capture_output=True, timeout=30)


class Unavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no kernel support)."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {(r.stderr or r.stdout).strip()}")


class Network:
    """Hosts ``names`` (``name -> namespace``, ``name -> address``) on one switch.

    Always :meth:`close` it (or use it as a context manager): namespaces outlive processes.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if shutil.which("ip") is None:
            raise Unavailable("no `ip` binary (iproute2) on PATH")
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        sweep_stale()
        tag = str(os.getpid())  # unique while this process lives; sweep_stale relies on it
        self.switch = f"lf-sw-{tag}"
        self.netns = {name: f"lf-{name}-{tag}" for name in names}
        self.addr = {name: f"{SUBNET}.{10 + i}" for i, name in enumerate(names)}
        self._made: list[str] = []
        atexit.register(self.close)  # a second line of defence if the caller's finalizer is lost
        try:
            self._build()
            self.check()
        except BaseException:
            self.close()
            raise

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (name, ns) in enumerate(self.netns.items()):
            self._add(ns)
            port = f"p{i}"
            _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", IFNAME)
            _ip("-n", self.switch, "link", "set", IFNAME, "netns", ns)
            _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr[name]}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")

    def check(self) -> None:
        """Every host reaches every other one over tcp (bounded: 3 s a probe)."""
        for name in self.netns:
            others = [a for n, a in self.addr.items() if n != name]
            r = subprocess.run(
                self.cmd(name, [sys.executable, "-c", _PROBE, *others]),
                capture_output=True,
                text=True,
                timeout=60,
            )
            if r.returncode != 0:
                raise RuntimeError(f"host {name} cannot reach its peers: {r.stderr.strip()}")

    def cmd(self, host: str, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run on ``host`` (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.netns[host], *cmd]

    def close(self) -> None:
        """Kill what still runs in the hosts, then delete every namespace (and so every link).
        Idempotent; never raises."""
        for ns in reversed(self._made):
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["IFNAME", "SUBNET", "Network", "Unavailable", "sweep_stale"]
