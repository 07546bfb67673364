"""Tests of sae.data.tokens: contexts of fixed length with BOS, and the train / validation / test
split by position (disjoint, deterministic, the test split's minimum size enforced)."""

from __future__ import annotations

import pytest
import torch

from sae import data as sdata
from sae.data import tokenize_contexts


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

class _CharTokenizer:
    """One token per character (code point % 100 + 3); BOS is 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) % 100 + 3 for c in text]}


def test_tokenize_contexts_split():
    tok = _CharTokenizer()
    texts = ["a" * 95, "b" * 40, "c" * 5]  # 95 chars -> 10 chunks of 9 (+BOS), 40 -> 4, 5 -> 0
    train, held = tokenize_contexts(texts, tok, ctx_len=10, held_out_fraction=0.25)
    assert train.shape[1] == held.shape[1] == 10
    assert (train[:, 0] == 1).all() and (held[:, 0] == 1).all()
    a, b = ord("a") % 100 + 3, ord("b") % 100 + 3
    # text a: 10 chunks, last round(2.5)=2 held out; text b: 4 chunks, last 1 held out
    assert train.shape[0] == 8 + 3 and held.shape[0] == 2 + 1
    assert (train[:8, 1:] == a).all() and (train[8:, 1:] == b).all()
    assert (held[:2, 1:] == a).all() and (held[2:, 1:] == b).all()
    again = tokenize_contexts(texts, tok, ctx_len=10, held_out_fraction=0.25)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)

    no_bos, _ = tokenize_contexts(["x" * 30], tok, ctx_len=10, held_out_fraction=0.0, add_bos=False)
    assert no_bos.shape == (3, 10) and (no_bos != 1).all()
    with pytest.raises(ValueError, match="ctx_len"):
        tokenize_contexts(texts, tok, ctx_len=1)
    with pytest.raises(TypeError, match="texts"):
        tokenize_contexts("one string", tok)


def test_tokenize_contexts_disjoint_positions():
    """Held-out contexts are the tail of each text: no token position is in both splits."""

    class Positional:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": list(range(len(text)))}

    train, held = tokenize_contexts(["z" * 1000], Positional(), ctx_len=16, held_out_fraction=0.2)
    assert set(train.flatten().tolist()).isdisjoint(held.flatten().tolist())
    assert held.min() > train.max()


def test_token_splits_three_way():
    tok = _CharTokenizer()
    texts = ["a" * 180, "b" * 45]  # 20 and 5 contexts of 9 text tokens (+ BOS)
    splits = sdata.token_splits(texts, tok, ctx_len=10, validation_fraction=0.1, test_fraction=0.2)
    a, b = ord("a") % 100 + 3, ord("b") % 100 + 3
    # text a: 4 test, 2 validation, 14 train; text b: 1 test, 1 validation (at least one each), 3 train
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [14 + 3, 2 + 1, 4 + 1]
    assert (splits.test[:4, 1:] == a).all() and (splits.test[4:, 1:] == b).all()
    assert (splits.validation[:2, 1:] == a).all() and (splits.train[14:, 1:] == b).all()
    assert splits.bos_id == 1 and (splits.test[:, 0] == 1).all()
    assert splits.n_tokens() == {"train": 170, "validation": 30, "test": 50}
    with pytest.raises(ValueError, match="min_test_tokens"):
        sdata.token_splits(texts, tok, ctx_len=10, test_fraction=0.2, min_test_tokens=51)
    with pytest.raises(ValueError, match="validation_fraction \\+ test_fraction"):
        sdata.token_splits(texts, tok, ctx_len=10, validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(KeyError, match="name"):
        splits["held_out"]


def test_token_splits_are_disjoint_by_position():
    class Positional:
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": list(range(len(text)))}

    s = sdata.token_splits(["z" * 2000], Positional(), ctx_len=16, validation_fraction=0.1, test_fraction=0.1)
    assert s.bos_id is None
    assert s.train.max() < s.validation.min() and s.validation.max() < s.test.min()
