"""Rank -> endpoint mapping for one node or many: templates, lists, and what validation refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.common.errors import ConfigError


def cfg(*over: str) -> LensfeedConfig:
    return load_config(None, list(over))


def endpoints(c: LensfeedConfig) -> list[str]:
    return [c.endpoint_for(r) for r in range(c.world_size)]


def test_one_template_covers_a_cluster_of_producer_hosts() -> None:
    c = cfg(
        "world_size=4",
        "feed.ranks_per_node=2",
        "feed.hosts=[gpu-a,gpu-b]",
        "feed.endpoint=tcp://{host}:{port}",
        "feed.bind=tcp://0.0.0.0:{port}",
        "feed.insecure=true",
    )
    assert endpoints(c) == [
        "tcp://gpu-a:50000",
        "tcp://gpu-a:50001",
        "tcp://gpu-b:50002",
        "tcp://gpu-b:50003",
    ]
    assert [c.bind_for(r) for r in range(4)] == [f"tcp://0.0.0.0:{50000 + r}" for r in range(4)]


def test_ipc_paths_repeat_across_nodes_but_not_within_one() -> None:
    c = cfg(
        "world_size=4", "feed.ranks_per_node=2", "feed.endpoint=ipc:///tmp/lf/r{local_rank}.sock"
    )
    assert endpoints(c) == ["ipc:///tmp/lf/r0.sock", "ipc:///tmp/lf/r1.sock"] * 2
    with pytest.raises(ConfigError, match="ranks 0 and 1 would share the endpoint"):
        cfg("world_size=4", "feed.ranks_per_node=2", "feed.endpoint=ipc:///tmp/n{node_rank}.sock")


def test_tcp_endpoints_must_differ_everywhere_and_ports_come_from_the_base() -> None:
    with pytest.raises(ConfigError, match="ranks 0 and 2 would share"):
        cfg("world_size=4", "feed.ranks_per_node=2", "feed.endpoint=tcp://h:{local_rank}9")
    c = cfg("world_size=3", "feed.endpoint=tcp://h:5{rank:04d}")
    assert endpoints(c) == ["tcp://h:50000", "tcp://h:50001", "tcp://h:50002"]
    assert c.bind_for(2) == "tcp://127.0.0.1:50002"  # loopback unless feed.bind says otherwise
    c = cfg("world_size=2", "feed.endpoint=tcp://h:{port}", "feed.base_port=6000")
    assert endpoints(c) == ["tcp://h:6000", "tcp://h:6001"]
    with pytest.raises(ConfigError, match="within 1-65535"):
        cfg("world_size=2", "feed.endpoint=tcp://h:{port}", "feed.base_port=65535")


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (["feed.endpoint=tcp://h:{nodes}"], "unknown placeholder(s) ['nodes']"),
        (["feed.endpoint=tcp://h:{rank"], "is not a valid template"),
        (["feed.endpoint=tcp://{host}:{port}", "feed.ranks_per_node=1"], "needs one per node"),
        (["feed.endpoint=tcp://h:1"], "ranks 0 and 1 would share"),
        (["feed.endpoint=udp://h:{port}"], "must start with ipc://, tcp:// or inproc://"),
        (["feed.endpoints=[tcp://127.0.0.1,tcp://127.0.0.2]"], "must be tcp://HOST:PORT"),
        (["feed.endpoints=[tcp://a:x,tcp://a:70000]"], "a tcp port is a number in 1-65535"),
        ([f"feed.endpoint=ipc:///tmp/{'d' * 100}/{{rank}}.sock"], "at most 107 bytes"),
        (["feed.bind=tcp://0.0.0.0:{port}x"], "a tcp port is a number in 1-65535"),
        (["feed.endpoint=tcp://h:{port}", "feed.bind=tcp://0.0.0.0:6000"], "bind the same"),
        (["feed.endpoints=[tcp://a:1]"], "lists 1 endpoint(s) for world_size 2"),
        (["feed.endpoints=[tcp://a:1,tcp://a:1]"], "ranks 0 and 1 would share"),
        (["feed.ranks_per_node=-1"], "must be >= 0"),
        # an abstract socket has no permissions: any local user could connect
        (["feed.endpoint=ipc://@lensfeed-{rank}"], "is an abstract socket (ipc://@NAME)"),
        (["feed.endpoints=[ipc:///tmp/a.sock,ipc://@b]"], "rank 1's endpoint 'ipc://@b' is an"),
        (["feed.bind=ipc://@lensfeed-{rank}"], "is an abstract socket"),
        (["feed.endpoint=ipc://run/r{rank}.sock"], "an ipc path must be absolute"),
        (["feed.endpoint=ipc://*"], "an ipc path must be absolute"),
        # IPv6 never worked: no ZMQ_IPV6, and the default bind is 127.0.0.1
        (["feed.endpoint=tcp://[::1]:{port}"], "IPv6 is not supported; use an IPv4 address or"),
        (["feed.endpoint=tcp://{host}:{port}", "feed.hosts=['::1']"], "IPv6 is not supported"),
        (["feed.endpoint=tcp://{host}:{port}", 'feed.hosts=["[fe80::1]"]'], "IPv6 is not"),
        (["feed.bind=tcp://[::]:{port}", "feed.endpoint=tcp://h:{port}"], "IPv6 is not supported"),
    ],
)
def test_bad_mappings_are_refused_before_anything_starts(over: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        cfg("world_size=2", *over)
    assert needle in str(exc_info.value)


def test_absolute_ipc_paths_and_ipv4_or_host_names_are_accepted() -> None:
    c = cfg("world_size=2", "feed.endpoint=ipc:///tmp/lf/r{rank}.sock")
    assert endpoints(c) == ["ipc:///tmp/lf/r0.sock", "ipc:///tmp/lf/r1.sock"]
    c = cfg("world_size=2", "feed.endpoints=[tcp://10.0.0.1:7000,tcp://gpu-b.local:7000]")
    assert endpoints(c) == ["tcp://10.0.0.1:7000", "tcp://gpu-b.local:7000"]
    c = cfg("world_size=2", "feed.endpoint=tcp://h:{port}", "feed.bind=tcp://*:{port}")
    assert c.bind_for(1) == "tcp://*:50001"


def test_an_explicit_list_or_file_maps_rank_by_rank(tmp_path: Path) -> None:
    c = cfg("world_size=2", "feed.endpoints=[tcp://a:7000,tcp://b:7000]")
    assert endpoints(c) == ["tcp://a:7000", "tcp://b:7000"]
    listing = tmp_path / "endpoints.txt"
    listing.write_text("# rank 0 first\ntcp://a:7000\n\n  tcp://b:7001  \n")
    c = cfg("world_size=2", f"feed.endpoints_file={listing}")
    assert endpoints(c) == ["tcp://a:7000", "tcp://b:7001"]
    with pytest.raises(ConfigError, match="cannot be read"):
        cfg("world_size=2", f"feed.endpoints_file={tmp_path / 'missing.txt'}")
