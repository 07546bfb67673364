"""Texts cut into fixed-length token contexts, split into train / validation / test.

Every text is tokenised on its own and cut into consecutive, non-overlapping contexts; with a
BOS token each context is BOS followed by ``ctx_len - 1`` text tokens. The split is by position
and needs no seed: the tail of every text is the test split, the stretch just before it the
validation split, the rest the training split. So no test token is ever in another split, and
choices made on the validation split (learning rates) never see the test split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["TokenSplits", "token_splits", "tokenize_contexts"]


@dataclass(frozen=True)
class TokenSplits:
    """Contexts ``[n_ctx, ctx_len]`` (LongTensors) of each split, and the BOS id that starts
    every context (``None`` when none was prepended)."""

    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    bos_id: int | None
    ctx_len: int

    def __getitem__(self, name: str) -> torch.Tensor:
        """The split called ``name``: ``"train"``, ``"validation"`` or ``"test"``."""
        if name not in ("train", "validation", "test"):
            raise KeyError(f"name: expected 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)

    def n_tokens(self) -> dict[str, int]:
        """Tokens per split, every position counted (BOS included)."""
        return {name: int(self[name].numel()) for name in ("train", "validation", "test")}


def _n_tail(fraction: float, n_chunks: int) -> int:
    """Chunks for a tail split: ``round(fraction * n_chunks)``, at least one when the fraction
    is positive and at least one chunk would remain before it."""
    n = int(round(fraction * n_chunks))
    if fraction > 0 and n == 0 and n_chunks >= 2:
        n = 1
    return min(n, max(n_chunks - 1, 0))


def token_splits(texts: Sequence[str], tokenizer, ctx_len: int = 256, *, validation_fraction: float = 0.05,
                 test_fraction: float = 0.1, min_test_tokens: int = 0, add_bos: bool = True) -> TokenSplits:
    """Cuts ``texts`` into contexts of ``ctx_len`` tokens and splits them by position.

    Of each text's ``c`` contexts (the remainder shorter than a context is dropped) the last
    ``t = round(test_fraction * c)`` are test, the ``round(validation_fraction * (c - t))`` before
    them validation (a fraction of the contexts the test split leaves, not of all ``c``), the rest
    train (a positive fraction gets at least one context while one is left for the splits before
    it). ``min_test_tokens``: raise unless the test split has at least that
    many tokens (the frontier asks for 80,000). With ``add_bos`` and a tokenizer that has a BOS
    token every context starts with it."""
    if isinstance(texts, str):
        raise TypeError("texts: expected a sequence of strings, got a single str")
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"ctx_len: expected an int >= 2, got {ctx_len!r}")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(f"validation_fraction + test_fraction: expected < 1 (something left to train on), "
                         f"got {validation_fraction} + {test_fraction}")
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    body = ctx_len - 1 if bos is not None else ctx_len
    parts: dict[str, list[torch.Tensor]] = {"train": [], "validation": [], "test": []}
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        n_chunks = len(ids) // body
        if n_chunks == 0:
            continue
        chunks = torch.tensor(ids[: n_chunks * body], dtype=torch.long).view(n_chunks, body)
        if bos is not None:
            chunks = torch.cat([torch.full((n_chunks, 1), bos, dtype=torch.long), chunks], dim=1)
        n_test = _n_tail(test_fraction, n_chunks)
        n_val = _n_tail(validation_fraction, n_chunks - n_test)
        n_train = n_chunks - n_test - n_val
        parts["train"].append(chunks[:n_train])
        parts["validation"].append(chunks[n_train:n_train + n_val])
        parts["test"].append(chunks[n_train + n_val:])
    if not parts["train"]:
        raise ValueError(f"texts: expected at least one text of >= {body} tokens, got none")
    splits = TokenSplits(**{name: torch.cat(chunks) for name, chunks in parts.items()},
                         bos_id=None if bos is None else int(bos), ctx_len=ctx_len)
    n_test = splits.n_tokens()["test"]
    if n_test < min_test_tokens:
        raise ValueError(f"test_fraction: {test_fraction} of this text gives {n_test:,} test tokens, expected "
                         f">= min_test_tokens = {min_test_tokens:,}; raise test_fraction or give more text")
    return splits


def tokenize_contexts(texts: Sequence[str], tokenizer, ctx_len: int = 256, *,
                      held_out_fraction: float = 0.1, add_bos: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: ``token_splits`` with no validation split and
    ``test_fraction=held_out_fraction``; LongTensors ``[n_train, ctx_len]``, ``[n_held_out, ctx_len]``."""
    splits = token_splits(texts, tokenizer, ctx_len, validation_fraction=0.0,
                          test_fraction=held_out_fraction, add_bos=add_bos)
    return splits.train, splits.test
