"""TopK and Expander sparse autoencoders.

Both share one base class that owns everything that is not the encoder/decoder weights: the
forward pass and its loss terms (FVU, AuxK), dead-latent tracking, BatchTopK, the config, and
safetensors checkpoints. Subclasses say only how to encode with a given bias and k, and how to
decode.

- ``TopKSAE`` (Gao et al. 2024): dense encoder ``W_enc [n, m]`` fused with the top-k
  (``topk_encode``), decoder ``SparseDecoder`` whose rows are kept unit-norm.
- ``ExpanderSAE`` (Mendoza-Smith 2026): every atom lives on ``degree`` of the ``m`` coordinates fixed
  by an expander graph; stores ``values [n, d]`` and ``rows [n, d]`` only. Atoms are the values
  normalised per latent, and the tied encoder reuses them (``expander_encode`` / ``expander_decode``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import topk_kernels as tk
from topk_kernels._dispatch import check_float

from .layers import SparseDecoder
from .masks import expander_mask


@dataclass
class SAEOutput:
    """What ``forward`` returns. Shapes: x_hat [..., m]; top_acts, top_indices [..., k]."""

    x_hat: Tensor
    top_acts: Tensor
    top_indices: Tensor
    fvu: Tensor  # sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch
    auxk_loss: Optional[Tensor]  # None when AuxK is off or no latent is dead
    dead_mask: Optional[Tensor]  # [n] bool: the latents counted dead for this step's AuxK
    auxk_indices: Optional[Tensor] = None  # [..., k_aux] latents the AuxK term used
    auxk_coef: float = 0.0

    @property
    def loss(self) -> Tensor:
        """The training objective: fvu + auxk_coef * auxk_loss."""
        return self.fvu if self.auxk_loss is None else self.fvu + self.auxk_coef * self.auxk_loss


class _SparseCoder(nn.Module):
    """Shared TopK machinery. Subclasses implement ``_encode_with(x_centered, bias, k)``, ``decode``,
    ``_decode_atoms(top_acts, top_indices)`` (decode without the bias) and ``decoder_values``."""

    def __init__(self, d_model: int, n_latents: int, k: int, *, auxk: bool = True, k_aux: Optional[int] = None,
                 auxk_coef: float = 1 / 32, dead_tokens_threshold: int = 10_000_000, batch_topk: bool = False,
                 batch_topk_cap: int = 4, backend: Optional[str] = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_latents", n_latents), ("k", k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if k > n_latents:
            raise ValueError(f"k: expected k <= n_latents={n_latents}, got {k}")
        self.d_model, self.n_latents, self.k = d_model, n_latents, k
        self.auxk = auxk
        # Gao et al.: k_aux = d_model / 2, coefficient 1/32, dead after 10M tokens without firing.
        self.k_aux = min(n_latents, k_aux if k_aux is not None else max(1, d_model // 2))
        self.auxk_coef = auxk_coef
        self.dead_tokens_threshold = dead_tokens_threshold
        self.batch_topk = batch_topk
        self.batch_topk_cap = batch_topk_cap
        self.backend = backend
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.int64))
        # BatchTopK's inference threshold: a running mean of the smallest activation kept per batch.
        self.register_buffer("batch_threshold", torch.zeros(()))
        self.register_buffer("batch_threshold_steps", torch.zeros((), dtype=torch.int64))

    # -- to implement ---------------------------------------------------------------------------
    def _encode_with(self, x_centered: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _decode_atoms(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def decoder_values(self) -> int:
        """Learned decoder values stored (n*m dense, n*d expander)."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        check_float("x", x)
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., m] -> (top_acts, top_indices) [..., k], sorted by descending pre-activation.

        With ``batch_topk`` at inference, keeps the per-token candidates above the learned threshold
        (the rest get activation 0), so the number of active latents varies per token.
        """
        self._check_input(x)
        x_centered = x - self.b_dec
        if not self.batch_topk:
            return self._encode_with(x_centered, self.b_enc, self.k)
        cap = min(self.n_latents, self.batch_topk_cap * self.k)
        acts, idx = self._encode_with(x_centered, self.b_enc, cap)
        if self.training:
            return self._batch_select(acts, idx)
        return acts * (acts > self.batch_threshold), idx

    def _batch_select(self, acts: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """BatchTopK (Bussmann et al. 2024): keep the B*k largest activations over the batch.

        Candidates are each token's top ``batch_topk_cap * k``; a token may hold at most that many.
        """
        flat = acts.reshape(-1)
        budget = min(flat.numel(), self.k * flat.numel() // acts.shape[-1])
        kth = flat.detach().topk(budget, sorted=False).values.min()
        keep = acts.detach() >= kth
        with torch.no_grad():
            kept_min = torch.where(keep & (acts > 0), acts.detach(), torch.full_like(acts, float("inf"))).min()
            if torch.isfinite(kept_min):
                steps = self.batch_threshold_steps + 1
                self.batch_threshold.add_((kept_min.float() - self.batch_threshold) / steps)
                self.batch_threshold_steps.copy_(steps)
        return acts * keep, idx

    def forward(self, x: Tensor) -> SAEOutput:
        """x [..., m] -> SAEOutput. In training mode also updates dead-latent counters."""
        top_acts, top_indices = self.encode(x)
        x_hat = self.decode(top_acts, top_indices)
        flat_x = x.reshape(-1, self.d_model)
        error = (x - x_hat).reshape(-1, self.d_model)
        total_variance = (flat_x - flat_x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
        fvu = error.pow(2).sum() / total_variance

        dead_mask = auxk_loss = auxk_indices = None
        if self.training:
            dead_mask = self.tokens_since_fired > self.dead_tokens_threshold
            num_dead = int(dead_mask.sum())
            if self.auxk and num_dead > 0:
                auxk_loss, auxk_indices = self._auxk_loss(x, error.detach(), dead_mask, num_dead, total_variance)
            self._update_dead_counts(top_acts, top_indices, flat_x.shape[0])
        return SAEOutput(x_hat, top_acts, top_indices, fvu, auxk_loss, dead_mask, auxk_indices, self.auxk_coef)

    def _auxk_loss(self, x, error, dead_mask, num_dead, total_variance):
        """Gao et al.'s AuxK: the top k_aux dead latents reconstruct the residual x - x_hat.

        Dead-only selection reuses the fused encoder: live latents get a bias so negative (half the
        dtype's lowest finite value, so sums stay finite) that they never win and ReLU zeroes them.
        """
        k_aux = min(self.k_aux, num_dead)
        dead_bias = self.b_enc.masked_fill(~dead_mask, torch.finfo(self.b_enc.dtype).min / 2)
        aux_acts, aux_idx = self._encode_with(x - self.b_dec, dead_bias, k_aux)
        error_hat = self._decode_atoms(aux_acts, aux_idx).reshape(-1, self.d_model)
        scale = min(num_dead / self.k_aux, 1.0)  # fewer dead latents than k_aux: weigh the term down
        loss = scale * (error_hat - error).pow(2).sum() / total_variance
        return loss, aux_idx

    @torch.no_grad()
    def _update_dead_counts(self, top_acts: Tensor, top_indices: Tensor, num_tokens: int) -> None:
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=top_indices.device)
        fired[top_indices.reshape(-1)[top_acts.reshape(-1) > 0]] = True
        self.tokens_since_fired += num_tokens
        self.tokens_since_fired[fired] = 0

    def dead_fraction(self, threshold: Optional[int] = None) -> float:
        t = self.dead_tokens_threshold if threshold is None else threshold
        return float((self.tokens_since_fired > t).float().mean())

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor, method: str = "median") -> None:
        """Set b_dec from a data sample [N, m]: its coordinate-wise median or mean."""
        self._check_input(sample)
        flat = sample.reshape(-1, self.d_model).float()
        if method == "median":
            value = flat.median(0).values
        elif method == "mean":
            value = flat.mean(0)
        else:
            raise ValueError(f"method: expected 'median' or 'mean', got {method!r}")
        self.b_dec.copy_(value.to(self.b_dec.dtype))

    # Decoder constraints the trainer calls; the TopK SAE overrides them, an Expander SAE's atoms
    # are normalised by construction so there is nothing to do.
    def remove_parallel_grads(self, indices: Optional[Tensor] = None) -> None:
        """Remove from each decoder row's gradient its component along the row (rows ``indices``)."""

    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """safetensors file with every parameter and buffer, and the config as metadata."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, path, metadata={"config": json.dumps(self.config()), "class": type(self).__name__})

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "_SparseCoder":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"path: {path} is not an SAE checkpoint (no config in its metadata)")
        kind = {c.__name__: c for c in (TopKSAE, ExpanderSAE)}.get(meta.get("class"), cls)
        if cls is not _SparseCoder and kind is not cls:
            raise ValueError(f"path: expected a {cls.__name__} checkpoint, got {meta.get('class')}")
        model = kind(**json.loads(meta["config"]))
        model.load_state_dict(load_file(path, device=device))
        return model.to(device)


class TopKSAE(_SparseCoder):
    """TopK SAE with a fused encoder and a sparse-gather decoder.

    Parameters: ``W_enc [n, m]``, ``b_enc [n]``, ``decoder.weight [n, m]`` (W_dec) and
    ``decoder.bias [m]`` (b_dec). Tied initialisation: unit-norm decoder rows, W_enc = W_dec.
    """

    def __init__(self, d_model: int, n_latents: int, k: int, *, device=None, dtype=None, **kwargs):
        super().__init__(d_model, n_latents, k, **kwargs)
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_model, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.decoder = SparseDecoder(n_latents, d_model, device=device, dtype=dtype, backend=self.backend)
        self._kwargs = kwargs
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = torch.randn(self.n_latents, self.d_model, device=self.W_enc.device)
        w /= w.norm(dim=1, keepdim=True)
        self.decoder.weight.copy_(w)
        self.W_enc.copy_(w)
        self.b_enc.zero_()
        self.decoder.bias.zero_()

    @property
    def W_dec(self) -> Tensor:
        return self.decoder.weight

    @property
    def b_dec(self) -> Tensor:
        return self.decoder.bias

    @property
    def decoder_values(self) -> int:
        return self.n_latents * self.d_model

    def config(self) -> dict:
        return dict(d_model=self.d_model, n_latents=self.n_latents, k=self.k, **self._kwargs)

    def _encode_with(self, x_centered, bias, k):
        return tk.topk_encode(x_centered, self.W_enc, bias, k, backend=self.backend)

    def _decode_atoms(self, top_acts, top_indices):
        return tk.sparse_decode(top_acts, top_indices, self.W_dec, backend=self.backend)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """[..., k] activations and indices -> x_hat [..., m]."""
        return self.decoder(top_acts, top_indices)

    @torch.no_grad()
    def remove_parallel_grads(self, indices: Optional[Tensor] = None) -> None:
        """g_j -= (g_j . w_j) w_j for the rows ``indices`` (default: all); w_j are unit-norm rows.

        Only rows that were active (or used by AuxK) have a gradient, so the trainer passes those.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        rows = slice(None) if indices is None else torch.unique(indices.reshape(-1))
        w, g = self.W_dec[rows], grad[rows]
        grad[rows] = g - (g * w).sum(-1, keepdim=True) * w / w.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps))


class ExpanderSAE(_SparseCoder):
    """Expander SAE trained in compact form.

    ``values [n, d]`` (Parameter) and ``rows [n, d]`` (buffer, from ``expander_mask(m, n, d, seed)``);
    atom j has ``values[j] / ||values[j]||`` at coordinates ``rows[j]`` (the paper's column
    normalisation). ``tied=True`` encodes with the same normalised atoms; ``tied=False`` adds
    separate ``enc_values [n, d]`` on the same support.
    """

    def __init__(self, d_model: int, n_latents: int, k: int, degree: int, seed: int = 0, tied: bool = True, *,
                 device=None, dtype=None, **kwargs):
        super().__init__(d_model, n_latents, k, **kwargs)
        self.degree, self.seed, self.tied = degree, seed, tied
        self.register_buffer("rows", expander_mask(d_model, n_latents, degree, seed=seed).to(device))
        self.values = nn.Parameter(torch.empty(n_latents, degree, device=device, dtype=dtype))
        self.enc_values = None if tied else nn.Parameter(torch.empty(n_latents, degree, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))
        self._kwargs = kwargs
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        v = torch.randn(self.n_latents, self.degree, device=self.values.device)
        v /= v.norm(dim=1, keepdim=True)
        self.values.copy_(v)
        if self.enc_values is not None:
            self.enc_values.copy_(v)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def decoder_values(self) -> int:
        return self.n_latents * self.degree

    def config(self) -> dict:
        return dict(d_model=self.d_model, n_latents=self.n_latents, k=self.k, degree=self.degree,
                    seed=self.seed, tied=self.tied, **self._kwargs)

    def atoms(self) -> Tensor:
        """[n, d] unit-norm atom values (column normalisation of the masked dictionary)."""
        norm = self.values.norm(dim=1, keepdim=True)
        return self.values / norm.clamp_min(torch.finfo(self.values.dtype).eps)

    def _encoder_values(self) -> Tensor:
        return self.atoms() if self.enc_values is None else self.enc_values

    def _encode_with(self, x_centered, bias, k):
        return tk.expander_encode(x_centered, self._encoder_values(), self.rows, bias, k, backend=self.backend)

    def _decode_atoms(self, top_acts, top_indices):
        return tk.expander_decode(top_acts, top_indices, self.atoms(), self.rows, self.d_model, backend=self.backend)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """[..., k] activations and indices -> x_hat [..., m]."""
        return tk.expander_decode(top_acts, top_indices, self.atoms(), self.rows, self.d_model, self.b_dec,
                                  backend=self.backend)

    def dense_decoder(self) -> Tensor:
        """[n, m] dense dictionary with the atoms on their supports (for checks and export)."""
        return tk.reference.expander_dense(self.atoms(), self.rows, self.d_model)
