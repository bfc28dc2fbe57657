"""Keeping DDP ranks in lockstep, and making them fail together.

Each step every rank reports whether it hit an error (one tiny all-reduce). If any did, all
ranks exchange the failure text (a fixed-size byte tensor, no pickling) and raise the same
:class:`RankFailedError`, so no rank is left waiting in a gradient all-reduce for a peer that has
already died. A rank that dies outright is caught by the process group's bounded timeout.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from lensfeed.common.errors import RankFailedError, RanksDisagreeError

_MSG_BYTES = 4096

log = logging.getLogger("lensfeed.trainer")


def init_process_group(*, timeout_s: float, device: torch.device) -> tuple[int, int]:
    """Join the torchrun group (gloo on CPU, nccl on GPU); alone = (0, 1) without a group."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        and os.environ.get("RANK") == "0"
    ):
        log.warning(
            "torchrun restarts reuse the rendezvous store, where restarted ranks can find the "
            "previous ranks' addresses and fail to connect (pytorch/pytorch#135712); run "
            "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _failure_json(rank: int, code: str, message: str) -> bytes:
    """What a failed rank tells the others, in at most ``_MSG_BYTES``: the message is cut to
    fit, never the JSON (a cut JSON would lose the rank and the code on every rank)."""
    code = str(code)[:64]
    while True:
        text = json.dumps({"rank": rank, "code": code, "message": message}, ensure_ascii=False)
        raw = text.encode()
        if len(raw) <= _MSG_BYTES:
            return raw
        keep = max(0, len(message) - (len(raw) - _MSG_BYTES) - 4)  # >= 1 byte per character
        message = message[:keep] + " ..."


def agree(error: BaseException | None, *, rank: int, device: torch.device) -> None:
    """Collective: raise :class:`RankFailedError` on every rank if any rank passed an error."""
    if not _active():
        if error is not None:
            code = getattr(error, "code", "internal")
            raise RankFailedError(rank, code, str(error)) from error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    text = b""
    if error is not None:
        text = _failure_json(rank, getattr(error, "code", "internal"), str(error))
    mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8, device=device)
    if text:
        mine[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for buf in gathered:
        raw = bytes(buf.cpu().numpy()).rstrip(b"\0")
        if raw:
            try:
                info = json.loads(raw)
            except ValueError:
                info = {"rank": -1, "code": "internal", "message": raw.decode(errors="replace")}
            raise RankFailedError(info["rank"], info["code"], info["message"]) from error
    raise RankFailedError(-1, "internal", "a rank failed without a message")


_SAME_HINT = "every producer must use the same batch_size and samples_per_regeneration_cycle"


def check_same(value: int, *, what: str, device: torch.device, hint: str = _SAME_HINT) -> None:
    """Collective: every rank must hold the same ``value`` (e.g. batches in this cycle)."""
    if not _active():
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RanksDisagreeError(
            f"ranks disagree on {what}: values range from {lo} to {hi} (this rank: {value}); "
            + hint
        )


__all__ = ["agree", "check_same", "init_process_group"]
