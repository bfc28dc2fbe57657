"""Throughput section: the raw ZeroMQ limit, lensfeed, the original loop and DataLoader on the
same data and message sizes. Every row is samples/s and GB/s of wire payload (all tensor
frames: tokens or activations + ``sample_idx``), median of ``Settings.repeats`` repeats."""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from benchmarks import baselines
from benchmarks.common import GB, Proc, Workdir, py, read_report, summarize
from benchmarks.feed import FeedResult, run_feed
from benchmarks.settings import BATCH, Case, Settings
from lensfeed.producer.ahead import Ready
from lensfeed.producer.packing import AUTO_MAX_BATCHES, Packer

log = logging.getLogger("benchmarks")


def _row(
    case: Case, method: str, shuffle: bool | None, samples_per_s: list[float], **extra: Any
) -> dict[str, Any]:
    return {
        "case": case.key,
        "label": case.label,
        "batch_bytes": case.batch_bytes,
        "method": method,
        "shuffle": shuffle,
        "samples_per_s": summarize(samples_per_s),
        "gb_per_s": summarize([s * case.bytes_per_sample / GB for s in samples_per_s]),
        **extra,
    }


def message_batches(case: Case) -> int:
    """Batches per message lensfeed sends for ``case``, from the producer's own packing rule:
    token cases are gathered a message at a time; the activation cases come from a transform
    that builds one batch at a time, which the packer stacks only while it pays."""
    if not case.transform:
        return Packer(batch_nbytes=case.batch_bytes).pack
    items = [Ready("batch", 0, j, nbytes=case.batch_bytes) for j in range(AUTO_MAX_BATCHES)]
    return len(Packer().groups(items)[0])


def measure_limit(
    work: Workdir,
    case: Case,
    settings: Settings,
    *,
    tuned: bool = False,
    pack: int = 1,
    endpoint: str | None = None,
    keys: Path | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """Raw pyzmq PUSH -> PULL of ``pack * case.batch_bytes`` messages, one round per repeat
    (``tuned``: the receiver keeps large blocks in the heap, as ``feed.tune_malloc`` does;
    ``pack`` > 1: the limit at the message size lensfeed actually sends, ``limit@msg``, which
    the caller runs tuned). ``endpoint`` (default a fresh ipc socket) and ``keys`` (CurveZMQ
    with a ``lensfeed keys`` set) serve the transport comparison of ``benchmarks.curve``."""
    count = max(1, settings.batches_per_cycle(case) // pack)
    method = method or ("limit@msg" if pack > 1 else ("limit+malloc" if tuned else "limit"))
    name = f"{method.replace('+', '-').replace('@', '-')}-{case.key}"
    endpoint = endpoint or work.endpoint(name)
    report = work.path(f"{name}.json")
    rounds = settings.repeats + 1
    common = ["--endpoint", endpoint, "--count", str(count), "--rounds", str(rounds)]
    common += ["--keys", str(keys)] if keys is not None else []
    # The sender first: the receiver reads its CPU time at each round's end, with its own.
    send = Proc(
        py("benchmarks.limit", "send", *common, "--nbytes", str(pack * case.batch_bytes)),
        log=work.path(f"{name}-send.log"),
    )
    recv = Proc(
        py("benchmarks.limit", "recv", *common, "--report", str(report))
        + ["--peer-pid", str(send.pid)]
        + (["--tune-malloc"] if tuned else []),
        log=work.path(f"{name}-recv.log"),
    )
    try:
        if recv.wait(300) != 0:
            raise RuntimeError(f"limit receiver failed:\n{recv.tail()}\n{send.tail()}")
    finally:  # the sender has sent everything and waits to be stopped
        recv.kill()
        send.kill()
    r = read_report(report)
    rates = [count * pack * BATCH / t for t in r["round_s"]]
    round_bytes = count * pack * BATCH * case.bytes_per_sample
    cpus = r["round_cpu_s"]
    return _row(
        case,
        method,
        None,
        rates,
        batches_per_repeat=count * pack,
        samples_per_message=pack * BATCH,
        cpu_s_per_gb=summarize([(c1 - c0) / (round_bytes / GB) for c0, c1 in pairwise(cpus)]),
    )


def steady_feed(
    work: Workdir,
    name: str,
    case: Case,
    settings: Settings,
    data: dict[str, Path],
    *,
    shuffle: bool,
    profile: bool = False,
    thread_cpu: bool = False,
) -> tuple[FeedResult, list[float], int]:
    """Producer process -> FeedClient process: a warm-up cycle of ``n`` batches, then one cycle
    of ``repeats * n + 1`` batches timed in blocks of ``n`` (one block per repeat), so each
    repeat is steady-state streaming like a raw-limit round. Returns the result, samples/s per
    block and ``n``."""
    batch = BATCH
    n = settings.batches_per_cycle(case)
    res = run_feed(
        work,
        name,
        dataset=data[case.dataset],
        initial_batches=n,
        cycle_batches=settings.repeats * n + 1,
        cycles=2,
        warmup=1,
        batch_size=batch,
        shuffle=shuffle,
        transform=case.transform,
        consumer_args=["--block", str(n)],
        profile=profile,
        thread_cpu=thread_cpu,
    )
    blocks = res.blocks()
    assert len(blocks) == settings.repeats, blocks
    want = batch * case.bytes_per_sample * n
    assert all(b["bytes"] == want for b in blocks), "payload differs from the case"
    return res, [b["batches"] * batch / b["seconds"] for b in blocks], n


def measure_lensfeed(
    work: Workdir,
    case: Case,
    settings: Settings,
    data: dict[str, Path],
    *,
    shuffle: bool,
) -> dict[str, Any]:
    name = f"lensfeed-{case.key}-{'shuf' if shuffle else 'seq'}"
    res, rates, n = steady_feed(work, name, case, settings, data, shuffle=shuffle)
    timed = res.timed_cycles()[0]
    return _row(
        case,
        "lensfeed",
        shuffle,
        rates,
        batches_per_repeat=n,
        samples_per_message=BATCH * message_batches(case),
        # The whole timed cycle, its boundary (NEXT_CYCLE handshake, cleanup) included.
        cycle_samples_per_s=timed["samples"] / timed["seconds"],
        boundary_s=timed["boundary_s"],
        consumer_wait_s=timed["wait_s"],
        producer_cpu_s=res.producer["cpu_user_s"] + res.producer["cpu_sys_s"],
        consumer_cpu_s=res.consumer["cpu_user_s"] + res.consumer["cpu_sys_s"],
        cpu_s_per_gb=summarize([b["cpu_s"] / (b["bytes"] / GB) for b in res.blocks()]),
    )


def measure_original(
    case: Case, settings: Settings, data: dict[str, Path], *, shuffle: bool
) -> dict[str, Any]:
    samples = settings.original_samples[case.key]
    runs = baselines.run_original(
        data[case.dataset],
        samples=samples,
        batch_size=BATCH,
        shuffle=shuffle,
        repeats=settings.repeats,
    )
    return _row(
        case,
        "original",
        shuffle,
        [r["samples"] / r["seconds"] for r in runs],
        samples_per_repeat=samples,
        regen_s=summarize([r["regen_s"] for r in runs]),
        iterate_s=summarize([r["iterate_s"] for r in runs]),
    )


def measure_dataloader(
    case: Case, settings: Settings, data: dict[str, Path], *, shuffle: bool, workers: int
) -> dict[str, Any]:
    samples = settings.dataloader_samples[case.key]
    runs = baselines.run_dataloader(
        data[case.dataset],
        samples=samples,
        batch_size=BATCH,
        shuffle=shuffle,
        workers=workers,
        repeats=settings.repeats,
    )
    return _row(
        case,
        f"dataloader-w{workers}",
        shuffle,
        [r["samples"] / r["seconds"] for r in runs],
        samples_per_repeat=samples,
    )


def run(
    work: Workdir,
    settings: Settings,
    data: dict[str, Path],
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for case in settings.selected():
        pack = message_batches(case)
        # The raw limit; at lensfeed's message size (limit@msg) with the receiver's malloc tuned
        # like lensfeed's processes (feed.tune_malloc: untuned, its 8 MiB frames page-fault in
        # and out of the heap and the row's speed and CPU per byte swing several-fold between
        # runs); and tuned at one batch per message (limit+malloc).
        kinds: list[tuple[str, dict[str, Any]]] = [("limit", {})]
        if pack > 1:
            kinds.append((f"limit@msg ({pack} batches per message)", {"pack": pack, "tuned": True}))
        if settings.tuned_limit:
            kinds.append(("limit+malloc", {"tuned": True}))
        refs = []
        for label, kw in kinds:
            progress(f"{label} {case.key}")
            refs.append(measure_limit(work, case, settings, **kw))
        rows.extend(refs)
        for shuffle in settings.orders:
            s = "shuffled" if shuffle else "sequential"
            progress(f"lensfeed {case.key} {s}")
            rows.append(measure_lensfeed(work, case, settings, data, shuffle=shuffle))
            if case.tokens:
                progress(f"original {case.key} {s}")
                rows.append(measure_original(case, settings, data, shuffle=shuffle))
                for workers in (0, 2):
                    progress(f"dataloader w{workers} {case.key} {s}")
                    rows.append(
                        measure_dataloader(case, settings, data, shuffle=shuffle, workers=workers)
                    )
        # Bracket the case: every limit row (the CPU-per-byte reference among them) is measured
        # before and after its lensfeed runs and the repeats are pooled, so slow drifts of this
        # shared machine hit both sides alike.
        for (label, kw), ref in zip(kinds, refs, strict=True):
            progress(f"{label} {case.key} (again)")
            _pool(case, ref, measure_limit(work, case, settings, **kw))
    return rows


def _pool(case: Case, row: dict[str, Any], again: dict[str, Any]) -> None:
    """Add ``again``'s repeats (speed and CPU per byte) to ``row``'s."""
    speeds = row["samples_per_s"]["values"] + again["samples_per_s"]["values"]
    cpus = row["cpu_s_per_gb"]["values"] + again["cpu_s_per_gb"]["values"]
    row["samples_per_s"] = summarize(speeds)
    row["gb_per_s"] = summarize([v * case.bytes_per_sample / GB for v in speeds])
    row["cpu_s_per_gb"] = summarize(cpus)


__all__ = ["run"]
