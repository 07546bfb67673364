"""Times the pieces of one frontier SAE at the real size on the real model (SmolLM2-135M-Instruct,
float32, layer 15; n = 4608, k = 64): harvest, the CE baseline, 30 training steps of 1024 tokens,
CE with the SAE spliced in, firing density, each in seconds per token, extrapolated in
results/README.md. Run from the repository root:
``python results/measure_frontier_time.py`` (writes results/frontier_timing.json)."""

import json
import tempfile
import time

import torch

from sae.config import SAEConfig, TrainConfig
from sae.data import ActivationBuffer, load_austen_texts, load_model, n_decoder_layers, token_splits
from sae.evaluate import ce_baseline, ce_loss_recovered, firing_density
from sae.train import train

out = {}
t = time.perf_counter()
model, tok = load_model(dtype=torch.float32)
out["load_s"] = time.perf_counter() - t
layer = n_decoder_layers(model) // 2
splits = token_splits(load_austen_texts(), tok, 256, min_test_tokens=80_000)
out["tokens"] = splits.n_tokens()
n_ctx = 32
t = time.perf_counter()
buf = ActivationBuffer.harvest(model, splits.train[:n_ctx], layer, batch_size=8, storage_dtype=torch.bfloat16)
out["harvest_s_per_token"] = (time.perf_counter() - t) / (n_ctx * 255)
test = splits.test[:8]
t = time.perf_counter()
base = ce_baseline(model, test, layer, bos_id=splits.bos_id, mean_activation=buf[0:len(buf)].float().mean(0))
out["ce_baseline_s_per_token"] = (time.perf_counter() - t) / test.numel()
for arch, d in (("topk", None), ("expander", 7)):
    sae = SAEConfig(arch=arch, k=64, degree=d).build(576)
    sae.init_b_dec(buf[0:4096])
    steps = 30
    cfg = TrainConfig(total_tokens=1024 * steps, batch_size=1024, progress=False, checkpoint_every=10**6)
    t = time.perf_counter()
    train(sae, buf, cfg, tempfile.mkdtemp())
    out[f"{arch}_train_s_per_token"] = (time.perf_counter() - t) / (1024 * steps)
    t = time.perf_counter()
    ce_loss_recovered(model, sae, test, layer, baseline=base)
    out[f"{arch}_ce_s_per_token"] = (time.perf_counter() - t) / test.numel()
    t = time.perf_counter()
    firing_density(sae, buf)
    out[f"{arch}_density_s_per_token"] = (time.perf_counter() - t) / len(buf)
    print(out, flush=True)
with open("results/frontier_timing.json", "w") as f:
    json.dump(out, f, indent=1)
