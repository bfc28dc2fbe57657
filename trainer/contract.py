"""What a producer must send in every batch, checked before a batch is staged or yielded.

A batch is accepted only if its tensors are the ones the session's spec implies (or the ones the
caller declared for a custom producer), with the declared dtypes, a leading dimension of
``count * batch_size`` and the same per-sample shape as every earlier batch. Anything else is a
:class:`ProtocolError`, so a training loop never sees a tensor it did not ask for.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lensfeed.common import protocol as P
from lensfeed.common.errors import ProtocolError
from lensfeed.common.spec import DataSpec

#: The wire dtypes of each kind a spec can require.
_KINDS = {
    "int": {"uint8", "int8", "int16", "int32", "int64"},
    "float": {"float16", "bfloat16", "float32", "float64"},
}
_NAMES = {dt: name for name, (dt, _) in P.DTYPES.items()}

#: A custom producer's tensors: name -> (wire dtype, per-sample shape), as FakeProducer takes.
TensorSpec = Mapping[str, tuple[str, tuple[int, ...]]]


class TensorContract:
    """Checks each received batch against what the producer must send."""

    def __init__(self, spec: DataSpec, tensors: TensorSpec | None = None) -> None:
        self.batch_size = spec.batch_size
        self.pinned: dict[str, tuple[str, tuple[int, ...]]] = {}
        if tensors is None:
            required, optional = spec.tensor_contract()
            self.required = {n: _KINDS[k] for n, k in required.items()}
            self.optional = {n: _KINDS[k] for n, k in optional.items()}
            self.what = f"the data spec (builder {spec.builder}, columns {list(spec.columns)})"
        else:
            self.required = {n: {dt} for n, (dt, _) in tensors.items()}
            self.required.setdefault("sample_idx", {"int64"})
            self.optional = {}
            self.pinned = {n: (dt, tuple(shape)) for n, (dt, shape) in tensors.items()}
            self.what = "the declared tensors"

    def check(self, tensors: Mapping[str, torch.Tensor], count: int) -> None:
        """Raise :class:`ProtocolError` unless ``tensors`` is a valid message of ``count``
        batches; the first valid batch pins every per-sample shape for the rest of the run."""
        names = set(tensors)
        missing = self.required.keys() - names
        extra = names - self.required.keys() - self.optional.keys()
        if missing or extra:
            raise ProtocolError(
                f"batch tensors {sorted(names)} are not what {self.what} requires (missing "
                f"{sorted(missing)}, unexpected {sorted(extra)}); a custom producer's tensors "
                "are declared with FeedClient(tensors=...)"
            )
        rows = count * self.batch_size
        for name, t in tensors.items():
            dtype = _NAMES[t.dtype]
            allowed = self.required.get(name) or self.optional[name]
            if dtype not in allowed:
                raise ProtocolError(
                    f"tensor '{name}' has dtype {dtype}; {self.what} allows {sorted(allowed)}"
                )
            if t.dim() == 0 or t.shape[0] != rows:
                raise ProtocolError(
                    f"tensor '{name}' has shape {list(t.shape)}; a message of {count} batches "
                    f"needs leading dim {rows}"
                )
            got = (dtype, tuple(t.shape[1:]))
            want = self.pinned.setdefault(name, got)
            if got != want:
                raise ProtocolError(
                    f"tensor '{name}' is {got[0]} {list(got[1])} per sample, but earlier "
                    f"batches were {want[0]} {list(want[1])}"
                )


__all__ = ["TensorContract", "TensorSpec"]
