"""The activation workload three ways, on the same frozen model, tokens, layer and batch sizes:

* **raw forward**: the model's forward to the read layer over pre-stacked token tensors, and the
  per-sample gather of one position: the compute a cache regeneration cannot avoid;
* **seed**: the seed's in-process loop. Training stops every cycle while the cache is rebuilt
  (rows read one by one from the dataset, wrapping around at its end, forwarded in chunks),
  then trains over it;
* **lensfeed**: a ``lensfeed.producer`` process running the activation builder, and a
  FeedClient in this process (``feed.prepare_ahead``: cycle k+1 is built while k trains).

Two measurements:

1. **Producer throughput**: lensfeed with no training step, i.e. as fast as the producer
   serves, against the raw forward (target >= 0.9x: the feed adds <= 10%).
2. **End to end**: C cycles where each of the seed's cycles trains (a sleep per batch: a GPU
   step leaves the CPU free) for exactly as long as its regeneration took, and lensfeed replays
   the same steps; seed vs lensfeed wall time (target >= 1.9x, ideal 2x). The ideal holds
   from the first cycle: the producer streams a cycle as it builds it (one forward chunk, then
   the first batch), where the seed trains only once its whole cache is built.

Every forward runs with ``--threads`` torch threads (default 1) in every process: on a GPU
node the model runs on the GPU and the feed has CPU cores of its own; here one core stands in
for the GPU and the other is left to the feed. The model is a tiny ``Gemma2ForCausalLM`` built
from ``Gemma2Config`` and saved with ``save_pretrained`` (nothing is downloaded; needs
``transformers``), or lensfeed's own tiny model (``--model tiny``).

On a GPU node, ``--device cuda --dtype bfloat16`` puts the model, the seed's cache and the
client's batches on the GPU. Run: ``python -m benchmarks.activations [--cycles 8] [--repeats 5]``;
writes ``benchmarks/results/activations.json`` and ``activations.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Proc, Workdir, py
from lensfeed.common.config import LensfeedConfig, load_config
from lensfeed.producer import models
from lensfeed.trainer.client import FeedClient

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 256


def make_data(path: Path, *, rows: int, seq_len: int) -> None:
    import datasets

    ids = np.random.default_rng(0).integers(0, VOCAB, (rows, seq_len)).astype(np.int32)
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(path))


def make_gemma2(path: Path, *, hidden: int, layers: int, seq_len: int) -> str:
    """A seeded tiny Gemma-2 checkpoint directory (eager attention, float32)."""
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=seq_len,
        sliding_window=seq_len // 2,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(config).eval().save_pretrained(str(path))
    return str(path)


def overrides(args: argparse.Namespace, data: Path, model: str, sock_dir: Path) -> list[str]:
    """The config both the producer and this process load."""
    hidden = [f"activations.tiny.d_model={args.hidden}", f"activations.tiny.n_layers={args.layers}"]
    return [
        f"dataset.path={data}",
        "world_size=1",
        f"batch_size={args.batch}",
        f"dataset.on_the_fly.samples_per_regeneration_cycle={args.cycle_size}",
        "activations.builder=activations",
        f"activations.model={model}",
        f"activations.layer={args.layers - 1}",
        f"activations.forward_batch_size={args.batch}",
        f"activations.device={args.device}",
        f"activations.dtype={args.dtype}",
        *(hidden if model == "tiny" else []),
        f"feed.endpoint=ipc://{sock_dir}/activations.sock",
        "feed.prepare_ahead=true",
        f"feed.max_ahead_batches={2 * args.cycle_size // args.batch}",
        "feed.timeout_s=120",
        "training.collective_timeout_s=300",
    ]


class Forward:
    """The frozen model, the read layer and the position range, loaded as the builder does."""

    def __init__(self, cfg: LensfeedConfig, seq_len: int) -> None:
        act = cfg.activations
        self.device = torch.device(act.device)
        cuda = self.device.type == "cuda"
        # As the builder: the configured dtype on CUDA, float32 on CPU (cast when served).
        self.dtype = getattr(torch, act.dtype)
        self.model = models.load_model(
            act.model,
            tiny=act.tiny,
            device=self.device,
            dtype=self.dtype if cuda else torch.float32,
        )
        layer = models.resolve_layer(act.layer, models.model_layers(self.model, spec=act.model))
        assert layer is not None
        self.layer = layer
        self.rng = np.random.default_rng(0)
        self.lo, self.hi = max(1, act.min_pos), seq_len

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """One activation per row at a drawn position (left on the model's device)."""
        pos = torch.from_numpy(self.rng.integers(self.lo, self.hi, len(ids))).to(self.device)
        with torch.inference_mode():
            h = models.hidden_state(self.model, ids.to(self.device), self.layer)
            return h[torch.arange(len(ids), device=self.device), pos].to(self.dtype).contiguous()

    def sync(self) -> None:
        """Wait for queued GPU work, so a timer stops when the work is done."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def raw_forward(fwd: Forward, tokens: torch.Tensor, *, cycle: int, batch: int) -> float:
    """Seconds to forward one cycle of pre-stacked rows (the regeneration floor)."""
    t0 = time.perf_counter()
    for i in range(0, cycle, batch):
        fwd(tokens[i : i + batch])
    fwd.sync()
    return time.perf_counter() - t0


class SeedLoop:
    """The seed's way: a row iterator over the dataset that restarts at its end, a Python list
    cache of one cycle, forwarded in chunks, shuffled, then trained over."""

    def __init__(self, fwd: Forward, data: Path, *, cycle: int, batch: int) -> None:
        import datasets

        self.fwd, self.cycle, self.batch = fwd, cycle, batch
        self.ds = datasets.load_from_disk(str(data))
        self.it = iter(self.ds)
        self.rng = np.random.default_rng(0)

    def _next_row(self) -> list[int]:
        try:
            return next(self.it)["input_ids"]
        except StopIteration:
            self.it = iter(self.ds)
            return next(self.it)["input_ids"]

    def regenerate(self) -> torch.Tensor:
        rows = [self._next_row() for _ in range(self.cycle)]
        acts = [
            self.fwd(torch.tensor(rows[i : i + self.batch]))
            for i in range(0, self.cycle, self.batch)
        ]
        cache = torch.cat(acts)
        cache = cache[torch.from_numpy(self.rng.permutation(len(cache))).to(cache.device)]
        self.fwd.sync()
        return cache

    def run(self, cycles: int) -> dict[str, Any]:
        """``cycles`` cycles of regenerate-then-train where each cycle's training costs exactly
        what its regeneration just did (a sleep per batch): the case where overlap matters
        most, by construction, whatever this machine's speed does meanwhile. Returns the wall
        time, the part regenerating and each cycle's step (for lensfeed to replay)."""
        regen, steps = 0.0, []
        t0 = time.perf_counter()
        for _ in range(cycles):
            c0 = time.perf_counter()
            cache = self.regenerate()  # training stops here
            r = time.perf_counter() - c0
            regen += r
            batches = -(-len(cache) // self.batch)
            steps.append(r / batches)
            for i in range(0, len(cache), self.batch):
                _ = cache[i : i + self.batch]
                time.sleep(steps[-1])
        return {"wall_s": time.perf_counter() - t0, "wait_s": regen, "steps_s": steps}


def run_lensfeed(
    over: list[str],
    work: Path,
    *,
    steps_s: list[float],
    threads: int,
    name: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """A producer process and a FeedClient here: one cycle per entry of ``steps_s`` (the sleep
    per batch of that cycle's training); wall time from the first request (the producer's model
    load and the handshake are not timed, as the seed's model load is not)."""
    prod = Proc(
        py("lensfeed.producer", "--rank", "0", *over),
        log=work / f"{name}-producer.log",
        OMP_NUM_THREADS=str(threads),
    )
    try:
        feed = FeedClient.from_config(load_config(None, over), 0, device=device)
        feed.connect()
        w0 = feed.stats.wait_s
        t0 = time.perf_counter()
        t_steady = t0
        samples = steady_samples = 0
        for cycle in feed.cycles(len(steps_s)):
            if cycle.index == 1:
                t_steady = time.perf_counter()
            for batch in cycle:
                n = len(batch["sample_idx"])
                samples += n
                steady_samples += n if cycle.index >= 1 else 0
                if steps_s[cycle.index]:
                    time.sleep(steps_s[cycle.index])
        t1 = time.perf_counter()
        wait = feed.stats.wait_s - w0
        feed.close()
        if prod.wait(60) != 0:
            raise RuntimeError(f"producer failed:\n{prod.tail()}")
    finally:
        prod.kill()
    return {
        "wall_s": t1 - t0,
        "steady_s": t1 - t_steady,
        "wait_s": wait,
        "samples": samples,
        "samples_per_s": steady_samples / (t1 - t_steady),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The three-way comparison, in a scratch directory (data, model, the producer's ipc
    socket and logs) that is removed afterwards."""
    with Workdir(prefix="lfb-act-") as wd:
        return _measure(args, wd.root)


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    data = work / "ds"
    # Enough rows that C cycles wrap around the shard at least once.
    rows = max(args.cycle_size * 2, args.cycle_size * args.cycles // 3)
    make_data(data, rows=rows, seq_len=args.seq_len)
    if args.model == "gemma2":
        model = make_gemma2(
            work / "gemma2", hidden=args.hidden, layers=args.layers, seq_len=args.seq_len
        )
    else:
        model = "tiny"
    over = overrides(args, data, model, work)
    cfg = load_config(None, over)
    fwd = Forward(cfg, args.seq_len)
    import datasets

    tokens = torch.from_numpy(
        np.asarray(datasets.load_from_disk(str(data))["input_ids"][: args.cycle_size])
    ).long()
    raw_forward(fwd, tokens, cycle=args.cycle_size, batch=args.batch)  # warm-up
    seed = SeedLoop(fwd, data, cycle=args.cycle_size, batch=args.batch)
    seed.regenerate()  # warm-up
    batches = args.cycle_size // args.batch

    def raw_rate() -> float:
        t = [raw_forward(fwd, tokens, cycle=args.cycle_size, batch=args.batch) for _ in range(2)]
        return args.cycle_size / statistics.median(t)

    # This machine's speed drifts by tens of percent within a minute, so every comparison is
    # paired inside one repeat (the raw forward measured right before and after the feed; the
    # seed's training costs exactly what each of its regenerations did, and lensfeed replays
    # those steps) and the report gives the medians of the per-repeat ratios.
    repeats: list[dict[str, Any]] = []
    for r in range(args.repeats):
        raw_before = raw_rate()
        feed = run_lensfeed(
            over,
            work,
            steps_s=[0.0] * args.throughput_cycles,
            threads=args.threads,
            device=args.device,
            name=f"feed{r}",
        )
        raw = (raw_before + raw_rate()) / 2
        seed_run = seed.run(args.cycles)
        steps = seed_run["steps_s"]
        lens = run_lensfeed(
            over, work, steps_s=steps, threads=args.threads, name=f"e2e{r}", device=args.device
        )
        train_s = sum(steps) * batches
        repeats.append(
            {
                "raw_samples_per_s": raw,
                "feed": feed,
                "feed_over_raw": feed["samples_per_s"] / raw,
                "step_s": statistics.median(steps),
                "seed": seed_run,
                "lensfeed": lens,
                "train_only_s": train_s,
                "speedup": seed_run["wall_s"] / lens["wall_s"],
                # what perfect overlap would give: the seed's wall time over its training alone
                "ideal_speedup": seed_run["wall_s"] / train_s,
            }
        )

    def med(*keys: str) -> float:
        def get(x: Any) -> float:
            for k in keys:
                x = x[k]
            return float(x)

        return statistics.median(get(x) for x in repeats)

    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "repeats": repeats,
        "raw_samples_per_s": med("raw_samples_per_s"),
        "feed_samples_per_s": med("feed", "samples_per_s"),
        "feed_over_raw": med("feed_over_raw"),
        "step_s": med("step_s"),
        "seed_wall_s": med("seed", "wall_s"),
        "lensfeed_wall_s": med("lensfeed", "wall_s"),
        "train_only_s": med("train_only_s"),
        "speedup": med("speedup"),
        "ideal_speedup": med("ideal_speedup"),
        "lensfeed_wait_share": statistics.median(
            x["lensfeed"]["wait_s"] / x["lensfeed"]["wall_s"] for x in repeats
        ),
        "seed_wait_share": statistics.median(
            x["seed"]["wait_s"] / x["seed"]["wall_s"] for x in repeats
        ),
    }


def report(res: dict[str, Any]) -> str:
    s = res["settings"]
    model = (
        f"tiny Gemma-2 (hidden {s['hidden']}, {s['layers']} layers, eager attention)"
        if s["model"] == "gemma2"
        else f"lensfeed's tiny model (d_model {s['hidden']}, {s['layers']} layers)"
    )
    ok = lambda b: "**PASS**" if b else "**FAIL**"  # noqa: E731
    per = lambda key: ", ".join(f"{x[key]:.2f}" for x in res["repeats"])  # noqa: E731
    return "\n".join(
        [
            f"{model}, read layer {s['layers'] - 1}, seq {s['seq_len']}, batch and forward chunk "
            f"{s['batch']}, cycle {s['cycle_size']} samples, {s['dtype']} on {s['device']}, "
            f"{s['threads']} torch "
            f"thread(s) per process. {s['repeats']} repeats, each pairing its measurements; "
            "medians of the per-repeat ratios (each repeat's in brackets). Training step: "
            f"{res['step_s'] * 1e3:.1f} ms/batch (sleep, median): each seed cycle trains for "
            "exactly as long as its regeneration took, and lensfeed replays the same steps.",
            "",
            "| measurement | value | target | pass |",
            "|---|---|---|---|",
            f"| raw forward | {res['raw_samples_per_s']:,.0f} samples/s | – | – |",
            f"| lensfeed producer -> client, no step ({s['throughput_cycles']} cycles, steady) | "
            f"{res['feed_samples_per_s']:,.0f} samples/s = {res['feed_over_raw']:.2f}x raw "
            f"[{per('feed_over_raw')}] | >= 0.9x | {ok(res['feed_over_raw'] >= 0.9)} |",
            f"| seed loop, {s['cycles']} cycles | {res['seed_wall_s']:.2f} s wall "
            f"({res['seed_wait_share']:.0%} waiting on regeneration) | – | – |",
            f"| lensfeed, {s['cycles']} cycles | {res['lensfeed_wall_s']:.2f} s wall "
            f"({res['lensfeed_wait_share']:.1%} waiting on data; the training steps alone: "
            f"{res['train_only_s']:.2f} s) | – | – |",
            f"| end-to-end speed-up over the seed | {res['speedup']:.2f}x [{per('speedup')}] | "
            f">= 1.9x | {ok(res['speedup'] >= 1.9)} |",
            f"| perfect overlap in the same repeats (seed wall / its training alone) | "
            f"{res['ideal_speedup']:.2f}x [{per('ideal_speedup')}] | – | – |",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.activations", description=__doc__)
    p.add_argument("--model", choices=("gemma2", "tiny"), default="gemma2")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cycle-size", type=int, default=1024)
    p.add_argument("--cycles", type=int, default=8, help="end-to-end cycles")
    p.add_argument("--throughput-cycles", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the model runs (and batches land)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="activation dtype (the model computes in it on CUDA, in float32 on CPU)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    res = measure(args)
    md = report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activations.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "activations.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
