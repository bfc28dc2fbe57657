"""lockstep.agree: every rank learns which rank failed, with what code and message, whatever
the message holds (a config refusal can name two dataset paths of 4096 characters each)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lensfeed.common.errors import RankFailedError, RemoteError
from lensfeed.trainer.lockstep import _MSG_BYTES, _failure_json, agree
from tests._util import free_port

pytestmark = pytest.mark.timeout(60)

MESSAGES = [
    "configs differ: batch_size: 16 vs 32",
    "configs differ: dataset: '" + "a" * 4096 + "' vs '" + "b" * 4096 + "'",
    "données " + "é" * 3000,  # 2 bytes each in UTF-8, 6 each if JSON escaped them
]


@pytest.fixture
def group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("message", MESSAGES, ids=["short", "long", "non-ascii"])
def test_the_failing_rank_and_its_code_survive_any_message(group, message):
    with pytest.raises(RankFailedError) as exc_info:
        agree(RemoteError("state_mismatch", message, rank=3), rank=3, device=torch.device("cpu"))
    err = exc_info.value
    assert err.failed_rank == 3
    assert err.failed_code == "state_mismatch"
    assert err.failed_message.startswith(message[:100])


@pytest.mark.parametrize("message", MESSAGES, ids=["short", "long", "non-ascii"])
def test_the_failure_record_is_whole_json_within_its_buffer(message):
    raw = _failure_json(5, "internal", message)
    assert len(raw) <= _MSG_BYTES
    info = json.loads(raw)
    assert (info["rank"], info["code"]) == (5, "internal")
    assert message.startswith(info["message"].removesuffix(" ..."))
