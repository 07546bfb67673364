"""Assertions and parameter lists shared by the op tests."""

import os

import pytest
import torch

from topk_kernels._common import HAS_TRITON

# The device the op tests run on (tests/conftest.py: ``pytest --device cuda``).
DEVICE = torch.device(os.environ.get("TOPK_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Per-dtype tolerances relative to the scale of the fp64 reference: one table for every op.
# TF32 (CUDA matmuls with torch.backends.cuda.matmul.allow_tf32) keeps 10 mantissa bits.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-10}
TF32_TOL = 2e-3

# Backends a test runs: the fast PyTorch path, and the Triton kernels (under the interpreter on
# CPU, compiled on CUDA).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]

interpreter_only = pytest.mark.skipif(ON_CUDA, reason="checks the Triton interpreter's behaviour")
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="runs with pytest --device cuda")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|), i.e. relative to the output's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * scale {scale:.3g}"


def assert_same_topk(idx: torch.Tensor, ref_idx: torch.Tensor, ref_pre: torch.Tensor, tol: float, what: str = "") -> None:
    """The selected latents equal the reference's, except where the reference's own values tie
    within ``tol`` (relative to the scale of ``ref_pre``): there the working precision cannot
    order them and a swap is accepted; never where either value is NaN or infinite. ``ref_pre`` is
    the fp64 [..., n] pre-activations."""
    assert idx.shape == ref_idx.shape, f"{what}: shape {tuple(idx.shape)} != {tuple(ref_idx.shape)}"
    differ = idx != ref_idx
    if not differ.any():
        return
    # Scale from the finite values: one inf would otherwise accept any swap. A NaN or an infinite
    # value is never "within tol" of anything, so where one is involved the ids must match exactly.
    finite = ref_pre[ref_pre.isfinite()]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    got, want = ref_pre.gather(-1, idx), ref_pre.gather(-1, ref_idx)
    bad = differ & ~((got - want).abs() <= tol * scale)
    assert not bad.any(), f"{what}: {int(bad.sum())} selected latents differ from the reference beyond ties"


def assert_grads_match(acts: torch.Tensor, ref_acts: torch.Tensor, leaves, ref_leaves, names, tol: float) -> None:
    """Back-propagates one random gradient through ``acts`` and through the fp64 ``ref_acts``; each
    leaf's gradient (None leaves skipped) keeps the leaf's dtype and matches the reference's
    within ``tol`` (``assert_close``)."""
    grad = torch.randn_like(ref_acts)
    acts.backward(grad.to(acts.dtype))
    ref_acts.backward(grad)
    for name, got, want in zip(names, leaves, ref_leaves):
        if got is None:
            continue
        assert got.grad.dtype == got.dtype, f"grad {name}: dtype {got.grad.dtype} != {got.dtype}"
        assert_close(got.grad, want.grad, tol, f"grad {name}")


def tiny_gpt2(bos_id: int = 0):
    """A random 3-layer GPT-2 (vocabulary 101, width 32) for layout and evaluation tests."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     bos_token_id=bos_id, eos_token_id=bos_id)
    return transformers.GPT2LMHeadModel(config).eval().requires_grad_(False)


def tiny_neox():
    """A random 3-layer GPT-NeoX (vocabulary 101, width 32) for layout and evaluation tests."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=64)
    return transformers.GPTNeoXForCausalLM(config).eval().requires_grad_(False)


_WORDS = "the cat sat on a mat and saw many dogs run over hills while birds sang in old trees".split()


def word_level_corpus(root, *, seed: int, paragraphs: int, words_per_paragraph: int):
    """Writes ``root/corpus.txt`` (random paragraphs over a 20-word vocabulary) and returns a
    word-level fast tokenizer trained on it, with ``<unk>`` = 0 and BOS ``<s>`` = 1: the CLI tests'
    stand-in for a hub tokenizer."""
    import random

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(_WORDS) for _ in range(words_per_paragraph)) for _ in range(paragraphs))
    (root / "corpus.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def force_fused(monkeypatch) -> None:
    """Make ``topk_encode(backend="triton")`` take the fused kernel wherever its K_PAD allows (on
    CUDA the dispatcher would pick the chunked strategy, so the fused kernel would go untested)."""
    import importlib

    te = importlib.import_module("topk_kernels.topk_encode")

    def fused_where_it_fits(B, m, n, k, *rest):
        return "fused" if te.pow2(k, lo=min(te.ENCODE_CONFIGS)) <= te.MAX_FUSED_K_PAD else "chunked"

    monkeypatch.setattr(te, "encode_strategy", fused_where_it_fits)


class StorageAllocations:
    """A ``TorchDispatchMode`` over the tensor storages each op creates (not views of its inputs'
    storages, nothing on the meta device, no sparse tensor): ``total`` bytes, an upper bound on the
    peak of what was allocated under it, the ``largest`` one and every one's bytes (``sizes``)."""

    def __new__(cls):
        from torch.utils import _pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            total = largest = 0

            def __init__(self):
                super().__init__()
                self.sizes: list[int] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))

                def strided(t):
                    return isinstance(t, torch.Tensor) and t.device.type != "meta" and t.layout == torch.strided

                inputs = {t.untyped_storage().data_ptr() for t in _pytree.tree_leaves((args, kwargs)) if strided(t)}
                for t in _pytree.tree_leaves(out):
                    if strided(t) and t.untyped_storage().data_ptr() not in inputs:
                        self.sizes.append(t.untyped_storage().nbytes())
                        self.total += self.sizes[-1]
                        self.largest = max(self.largest, self.sizes[-1])
                return out

        return Mode()
