"""Frozen models for the activation builder: loading, and reading one hidden state.

``activations.model`` names one of three sources:

``tiny``
    :class:`TinyCausalLM`, a seeded toy causal transformer built from ``activations.tiny``
    (token + learned position embedding, ``n_layers`` pre-norm ``nn.TransformerEncoderLayer``
    blocks under a causal mask, final norm, LM head). Weights are drawn from a private generator
    seeded by ``tiny.seed``, so every producer builds the same model without a download and
    without touching the global RNG.
a local directory
    A Hugging Face causal LM, loaded with
    ``transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``
    (``transformers`` is imported only here: ``pip install 'lensfeed[models]'``).
``package.module:function``
    A user factory, called with no arguments, returning an ``nn.Module``.

Hidden states are read without copying any model code, in one of two ways:

* **blocks** (the tiny model, and any module exposing its blocks as ``.layers`` or ``.blocks``,
  an ``nn.ModuleList``/``nn.Sequential`` that ``model(input_ids)`` runs in order): forward hooks.
  Layer 0 is the input of the first block (the embedding output), layer ``i`` the output of block
  ``i`` (a tuple output contributes its first element). The forward stops right after the wanted
  block, so later blocks and the LM head never run.
* **hf** (a ``transformers`` model, or any module with ``.config.num_hidden_layers`` whose forward
  accepts ``output_hidden_states=True`` and returns ``.hidden_states``/``["hidden_states"]``):
  ``output_hidden_states``, on ``model.base_model`` so no logits are computed. Indexing is
  Hugging Face's, so for most HF models the last layer includes the final norm.
"""

from __future__ import annotations

import pkgutil
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lensfeed.common.config import TinyModelConfig
from lensfeed.common.errors import ConfigError, TransformError

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class TinyCausalLM(nn.Module):
    """A small seeded causal LM for tests and demos: same config -> same weights, any process."""

    def __init__(self, cfg: TinyModelConfig) -> None:
        super().__init__()
        _check_tiny(cfg)
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        with torch.random.fork_rng(devices=[]):  # default inits draw from the global RNG
            self._build(cfg)
        # Explicit GPT-2-style init from a private generator: independent of torch's default
        # init functions and of the global RNG, so all ranks and restarts agree.
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02, generator=gen)
                elif name.endswith("bias"):
                    p.zero_()
                else:  # norm weights
                    p.fill_(1.0)

    def _build(self, cfg: TinyModelConfig) -> None:
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.d_model,
                cfg.n_heads,
                dim_feedforward=4 * cfg.d_model,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.n_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, L, vocab)``; hidden states are read with hooks on ``self.blocks``."""
        length = input_ids.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} > tiny max_seq_len {self.max_seq_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed(input_ids) + self.pos(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(
            length, device=input_ids.device, dtype=x.dtype
        )
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.lm_head(self.norm(x))


def _check_tiny(cfg: TinyModelConfig) -> None:
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        value = getattr(cfg, key)
        if value <= 0:
            raise ConfigError(f"'activations.tiny.{key}' must be positive (got {value})")
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"'activations.tiny.d_model' ({cfg.d_model}) must be divisible by "
            f"'activations.tiny.n_heads' ({cfg.n_heads})"
        )
    if cfg.seed < 0:
        raise ConfigError(f"'activations.tiny.seed' must be >= 0 (got {cfg.seed})")


# --------------------------------------------------------------------------- loading


def is_factory_spec(spec: str) -> bool:
    """``package.module:function`` (and not an existing path that happens to contain ':')."""
    return ":" in spec and not Path(spec).exists()


def load_model(
    spec: str,
    *,
    tiny: TinyModelConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Build or load the model ``spec`` names, frozen (eval, no grads), on ``device`` in ``dtype``.

    Raises :class:`ConfigError` for a spec that names nothing loadable (unknown path, malformed
    factory string, missing module or function) and :class:`TransformError`, naming the spec,
    when loading itself fails (factory raised, broken checkpoint, out of memory).
    """
    device = torch.device(device)
    if not spec:
        raise ConfigError(
            "'activations.model' is empty; use 'tiny', a model directory or "
            "'package.module:function'"
        )
    try:
        if spec == "tiny":
            model: nn.Module = TinyCausalLM(tiny)
        elif is_factory_spec(spec):
            model = _from_factory(spec)
        elif Path(spec).is_dir():
            model = _from_hf_dir(spec, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            raise ConfigError(
                f"'activations.model' = {spec!r} is not 'tiny', an existing model directory, "
                "or 'package.module:function'"
            )
        model = model.to(device=device, dtype=dtype)
    except torch.cuda.OutOfMemoryError as exc:
        _free_cuda(device)
        raise TransformError(
            f"CUDA out of memory loading model {spec!r} onto {device} in {dtype}: {exc}; "
            "use a smaller model or dtype, or a GPU with more free memory"
        ) from None
    model.eval()
    model.requires_grad_(False)
    model_layers(model, spec=spec)  # fail now, not at the first batch, if unreadable
    return model


def _from_factory(spec: str) -> nn.Module:
    if not _FACTORY_RE.match(spec):
        raise ConfigError(
            f"'activations.model' = {spec!r} is not a valid factory spec; expected "
            "'package.module:function'"
        )
    module_name, func_name = spec.split(":")
    try:
        func = pkgutil.resolve_name(spec)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"'activations.model' = {spec!r}: module {module_name!r} not found "
                "(is it on PYTHONPATH?)"
            ) from None
        raise TransformError(
            f"model factory {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    except AttributeError:
        func = None
    except Exception as exc:
        raise TransformError(
            f"model factory {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(func):
        raise ConfigError(
            f"'activations.model' = {spec!r}: module {module_name!r} has no callable {func_name!r}"
        )
    try:
        model = func()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise TransformError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TransformError(
            f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _from_hf_dir(path: str, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A local model directory; its own Python code (``auto_map``) runs only if the config
    opts in with ``activations.trust_remote_code``."""
    try:
        import transformers
    except ImportError:
        raise TransformError(
            f"loading model directory {path!r} needs Hugging Face transformers: "
            "pip install 'lensfeed[models]'"
        ) from None
    version = tuple(int(v) for v in re.findall(r"\d+", transformers.__version__)[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"  # torch_dtype is deprecated
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **{dtype_kw: dtype},
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise TransformError(
            f"cannot load Hugging Face causal LM from {path!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _free_cuda(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- hidden states


class _Stop(Exception):
    """Raised from a hook to skip the rest of the forward once the wanted layer is captured."""


def _is_transformers(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    for name in ("layers", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return blocks
    return None


def _hf_layers(model: nn.Module) -> int | None:
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return n if isinstance(n, int) and n > 0 else None


def model_layers(model: nn.Module, *, spec: str = "") -> int:
    """Number of blocks ``n``: valid layers are ``-(n + 1) .. n`` (0 = embedding output)."""
    if _is_transformers(model):
        n = _hf_layers(model)
        if n is not None:
            return n
    blocks = _blocks(model)
    if blocks is not None:
        return len(blocks)
    n = _hf_layers(model)
    if n is not None:
        return n
    raise TransformError(
        f"model {spec or type(model).__name__!r}: cannot read hidden states; expected a "
        "Hugging Face model, a module whose blocks are an nn.ModuleList/nn.Sequential named "
        "'.layers' or '.blocks', or a module with '.config.num_hidden_layers' that accepts "
        "output_hidden_states=True"
    )


def resolve_layer(layer: int, num_layers: int) -> int | None:
    """Non-negative index of ``layer`` among ``num_layers + 1`` hidden states, or None."""
    resolved = layer if layer >= 0 else num_layers + 1 + layer
    return resolved if 0 <= resolved <= num_layers else None


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        x = x.get("hidden_states", next(iter(x.values()), None))
        return _first_tensor(x)
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    raise TypeError(f"block output of type {type(x).__name__} holds no tensor")


def hidden_state(model: nn.Module, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden state ``(n, L, d)`` at ``layer`` for ``input_ids`` ``(n, L)``.

    Call under ``torch.inference_mode()``; ``layer`` may be negative (counted from the end).
    """
    n_layers = model_layers(model)
    idx = resolve_layer(layer, n_layers)
    if idx is None:
        raise ValueError(f"layer {layer} outside {-(n_layers + 1)}..{n_layers}")
    blocks = None if _is_transformers(model) else _blocks(model)
    if blocks is None:
        return _hf_hidden_state(model, input_ids, idx)

    captured: list[torch.Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_first_tensor(args if args else kwargs))
        raise _Stop

    def post_hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        captured.append(_first_tensor(output))
        raise _Stop

    if idx == 0:
        handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = blocks[idx - 1].register_forward_hook(post_hook)
    try:
        model(input_ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise TransformError(
            f"block {max(idx - 1, 0)} of {type(model).__name__} never ran: its forward must run "
            "'.layers'/'.blocks' in order"
        )
    return captured[0]


def _hf_hidden_state(model: nn.Module, input_ids: torch.Tensor, idx: int) -> torch.Tensor:
    kwargs: dict[str, Any] = {"output_hidden_states": True}
    if _is_transformers(model):
        model = getattr(model, "base_model", model)  # skip the LM head: no logits
        kwargs["use_cache"] = False
    out = model(input_ids=input_ids, **kwargs)
    states = getattr(out, "hidden_states", None)
    if states is None and isinstance(out, Mapping):
        states = out.get("hidden_states")
    if states is None:
        raise TransformError(
            f"{type(model).__name__}(output_hidden_states=True) returned no hidden_states"
        )
    return states[idx]


def max_positions(model: nn.Module) -> int | None:
    """Longest sequence the model's position embeddings cover, when it says."""
    if isinstance(model, TinyCausalLM):
        return model.max_seq_len
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int | None:
    """Token ids the model accepts (``0 .. vocab_size - 1``), when it says."""
    if isinstance(model, TinyCausalLM):
        return model.vocab_size
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


__all__ = [
    "TinyCausalLM",
    "hidden_state",
    "is_factory_spec",
    "load_model",
    "max_positions",
    "model_layers",
    "resolve_layer",
    "vocab_size",
]
