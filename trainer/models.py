"""Tiny CPU-friendly models for the reference trainer (the point is the data path, not them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNextToken(nn.Module):
    """Bigram-style next-token model over ``input_ids`` (ids are folded into ``vocab_size``)."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"].long() % self.vocab_size
        logits = self.out(torch.tanh(self.embed(ids[:, :-1])))
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), ids[:, 1:].reshape(-1))


class TinyAutoencoder(nn.Module):
    """A small sparse-autoencoder-like model over activation batches (``A``)."""

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.enc = nn.Linear(d_in, d_hidden)
        self.dec = nn.Linear(d_hidden, d_in)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        a = batch["A"].float()
        h = F.relu(self.enc(a))
        return F.mse_loss(self.dec(h), a) + 1e-3 * h.abs().mean()


def build_model(batch: dict[str, torch.Tensor], *, vocab_size: int, d_model: int) -> nn.Module:
    """Pick the toy model that fits the batch: activations -> autoencoder, tokens -> next-token."""
    torch.manual_seed(0)  # identical initial weights on every rank
    if "A" in batch:
        return TinyAutoencoder(batch["A"].shape[-1], d_model)
    return TinyNextToken(vocab_size, d_model)


__all__ = ["TinyAutoencoder", "TinyNextToken", "build_model"]
