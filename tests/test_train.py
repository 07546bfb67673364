"""The trainer: kill-and-resume lands on the same final step and weights as an uninterrupted run;
bad checkpoints are refused; the learning-rate schedule."""

import pytest
import torch

from helpers import StorageAllocations
from sae.data import ActivationBuffer
from sae import load_sae
from sae.models import ExpanderSAE, TopKSAE
from sae.train import CHECKPOINT, METRICS, CheckpointError, TrainConfig, _lr_at, adam, load_checkpoint, train


class _Killed(Exception):
    pass


def _run(out, make, buffer, cfg, kill_at=None, resume=False):
    sae = make()

    def on_step(step, log):
        if kill_at is not None and step == kill_at:
            raise _Killed

    try:
        result = train(sae, buffer, cfg, out, resume=resume, on_step=on_step)
    except _Killed:
        return sae, None
    return sae, result


@pytest.mark.parametrize("make", [
    lambda: TopKSAE(16, 48, 3, dead_tokens_threshold=64),
    lambda: ExpanderSAE(16, 48, 3, degree=4, dead_tokens_threshold=64),
], ids=["topk", "expander"])
def test_killed_run_resumes_to_the_same_result(tmp_path, make):
    torch.manual_seed(0)
    buffer = ActivationBuffer(torch.randn(700, 16))
    cfg = TrainConfig(batch_size=64, total_tokens=64 * 23, lr=1e-3, warmup_steps=3, checkpoint_every=5,
                      log_every=1, progress=False)
    torch.manual_seed(1)
    full, full_result = _run(tmp_path / "full", make, buffer, cfg)
    torch.manual_seed(1)
    _, killed = _run(tmp_path / "killed", make, buffer, cfg, kill_at=13)  # last checkpoint at step 10
    assert killed is None
    meta = load_checkpoint(tmp_path / "killed" / CHECKPOINT, make())
    assert meta["step"] == 10
    torch.manual_seed(2)  # resuming must not depend on the initialisation of the fresh object
    resumed, result = _run(tmp_path / "killed", make, buffer, cfg, resume=True)
    assert result.step == full_result.step == 23
    assert [h["step"] for h in result.history] == list(range(1, 24))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def _trained(tmp_path):
    buffer = ActivationBuffer(torch.randn(300, 8))
    cfg = TrainConfig(batch_size=50, total_tokens=200, checkpoint_every=2, progress=False)
    train(TopKSAE(8, 20, 2), buffer, cfg, tmp_path)
    return tmp_path / CHECKPOINT


def test_truncated_checkpoint_is_refused(tmp_path):
    path = _trained(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path, TopKSAE(8, 20, 2))


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = _trained(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor data, leaving the header valid
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, TopKSAE(8, 20, 2))


def test_checkpoint_for_another_shape_is_refused(tmp_path):
    path = _trained(tmp_path)
    with pytest.raises(CheckpointError, match="expected a TopKSAE"):
        load_checkpoint(path, TopKSAE(8, 21, 2))


@pytest.mark.parametrize("option,value", [("n_latents", 21), ("auxk_coef", 0.5), ("batch_topk", True)])
def test_resuming_another_sae_names_the_setting_that_differs(tmp_path, option, value):
    """The refusal names the differing key with both values, not only two full configs to compare by eye."""
    path = _trained(tmp_path)
    options = {"d_model": 8, "n_latents": 20, "k": 2, "dead_tokens_threshold": 50, option: value}
    saved = read_checkpoint(path).config[option]
    assert saved != value
    with pytest.raises(CheckpointError, match=rf"^checkpoint: {path} holds another SAE than the one to resume "
                                              rf"\({option} {saved!r} -> {value!r}\)"):
        load_checkpoint(path, TopKSAE(**options))


def test_existing_checkpoint_without_resume_is_refused(tmp_path):
    _trained(tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(TopKSAE(8, 20, 2), ActivationBuffer(torch.randn(300, 8)),
              TrainConfig(batch_size=50, total_tokens=200, progress=False), tmp_path)


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(warmup_steps=10, decay_fraction=0.2)
    lrs = [_lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


# -- nothing silently wrong, nothing lost ------------------------------------------------------

import json
import subprocess
import sys
import textwrap

from sae.checkpoint import read_checkpoint, read_train_record
from sae.errors import NonFiniteError, TrainingInterrupted
from sae.rundir import RunLockedError


def _all_finite_on_disk(out):
    ckpt = read_checkpoint(out / CHECKPOINT)
    return all(bool(torch.isfinite(t).all()) for t in ckpt.sae_tensors.values() if t.is_floating_point())


def _cfg(**kw):
    base = dict(batch_size=32, total_tokens=32 * 12, lr=1e-3, warmup_steps=2, checkpoint_every=3, log_every=1,
                progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("fresh", [True, False])
def test_one_nan_activation_stops_training_and_disk_stays_finite(tmp_path, fresh):
    x = torch.randn(200, 8)
    x[150, 3] = float("nan")
    sae = TopKSAE(8, 24, 3)
    if not fresh:  # initialised already: the NaN is met at its step
        sae.init_b_dec(x[:100])
    where = r"buffer: the training activations \(x\) hold NaN" if fresh else r"step \d+: the training activations"
    with pytest.raises(NonFiniteError, match=where):
        train(sae, ActivationBuffer(x), _cfg(), tmp_path)
    if (tmp_path / CHECKPOINT).exists():
        assert _all_finite_on_disk(tmp_path)


@pytest.mark.parametrize("case", ["huge_lr", "zero_variance", "nan_auxk_coef"])
def test_non_finite_loss_or_weights_stop_training(tmp_path, case):
    x = torch.randn(200, 8)
    sae, cfg = TopKSAE(8, 24, 3), _cfg()
    if case == "huge_lr":
        cfg = _cfg(lr=1e30, warmup_steps=0, grad_clip=0.0)
    elif case == "zero_variance":
        x = torch.ones(200, 8)
    else:
        sae = TopKSAE(8, 24, 3, dead_tokens_threshold=1)
        sae.auxk_coef = float("nan")  # the constructor refuses it; the trainer must stop on it too
    with pytest.raises(NonFiniteError, match=r"^step \d+: (the training loss|parameter \S+) is not finite"):
        train(sae, ActivationBuffer(x), cfg, tmp_path)
    if (tmp_path / CHECKPOINT).exists():
        assert _all_finite_on_disk(tmp_path)


def test_infinite_lr_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="lr: expected a finite number"):
        train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(100, 8)), _cfg(lr=float("inf")), tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


def test_fp16_is_refused_and_bf16_trains_finite(tmp_path):
    x = torch.randn(400, 16) * 300  # LLM-scale activations
    with pytest.raises(ValueError, match="fp16 training is not supported"):
        train(TopKSAE(16, 48, 4, dtype=torch.float16), ActivationBuffer(x.half()), _cfg(), tmp_path / "h")
    sae = TopKSAE(16, 48, 4, dtype=torch.bfloat16)
    result = train(sae, ActivationBuffer(x.bfloat16()), _cfg(total_tokens=32 * 20, lr=3e-3), tmp_path / "b")
    assert result.step == 20
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())
    assert all(torch.isfinite(torch.tensor(h["fvu"])) for h in result.history)


def test_a_second_trainer_on_one_directory_stops_at_once(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sae.rundir import RunLock
        lock = RunLock({str(tmp_path)!r}).__enter__()
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"out: {tmp_path} is in use by process {holder.pid}"):
            train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(100, 8)), _cfg(), tmp_path)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the killed holder's lock is stale: the next trainer takes it
    result = train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(100, 8)), _cfg(), tmp_path)
    assert result.step == 12


def test_stale_temp_files_are_removed_on_the_next_start(tmp_path):
    stale = tmp_path / ".checkpoint.safetensors.999999999.deadbeef.tmp"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"x" * 1000)
    train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(100, 8)), _cfg(), tmp_path)
    assert not stale.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_refuses_a_changed_batch_size_unless_allowed(tmp_path):
    buffer = ActivationBuffer(torch.randn(300, 8))
    _run(tmp_path, lambda: TopKSAE(8, 24, 3), buffer, _cfg(), kill_at=7)  # checkpoint at step 6
    with pytest.raises(ValueError, match=r"batch_size 32 -> 48"):
        train(TopKSAE(8, 24, 3), buffer, _cfg(batch_size=48), tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"base_lr 0.001 -> 0.002"):
        train(TopKSAE(8, 24, 3), buffer, _cfg(lr=2e-3), tmp_path, resume=True)
    result = train(TopKSAE(8, 24, 3), buffer, _cfg(batch_size=48), tmp_path, resume=True, allow_config_change=True)
    assert result.step == 6 + 4 and result.tokens == 6 * 32 + 4 * 48  # tokens counted as trained
    metrics = json.loads((tmp_path / METRICS).read_text())
    assert metrics["config_changes"] == [{"step": 6, "changed": {"batch_size": [32, 48]}}]


def test_history_survives_a_kill_between_checkpoint_and_metrics(tmp_path):
    buffer = ActivationBuffer(torch.randn(300, 8))
    _run(tmp_path, lambda: TopKSAE(8, 24, 3), buffer, _cfg(), kill_at=7)
    (tmp_path / METRICS).unlink()  # as if killed before metrics.json was written
    result = train(TopKSAE(8, 24, 3), buffer, _cfg(), tmp_path, resume=True)
    assert [h["step"] for h in result.history] == list(range(1, 13))


def test_ctrl_c_reports_where_it_stopped(tmp_path):
    def interrupt(step, log):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as info:
        train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(300, 8)), _cfg(), tmp_path, on_step=interrupt)
    assert (info.value.step, info.value.total, info.value.checkpoint_step) == (8, 12, 6)


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT",), ("SIGINT", "SIGINT")])
def test_a_signal_checkpoints_the_step_in_hand_and_a_second_stops_at_once(tmp_path, signals):
    """SIGTERM (preemption) or one Ctrl-C: the step in hand finishes and is checkpointed (here step 8,
    the last periodic checkpoint being 6), and the resumed run ends bit for bit where an
    uninterrupted one does. A second Ctrl-C stops at once, leaving the step-6 checkpoint."""
    import os
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("the test runner replaced Python's SIGINT handler")
    buffer = ActivationBuffer(torch.randn(300, 8))
    make = lambda: ExpanderSAE(8, 24, 3, degree=3, seed=1)  # noqa: E731
    whole = make()
    train(whole, buffer, _cfg(checkpoint_every=6, log_every=4), tmp_path / "whole")

    def interrupt(step, log):
        if step == 8:
            for name in signals:
                os.kill(os.getpid(), getattr(signal, name))

    with pytest.raises(TrainingInterrupted) as info:
        train(make(), buffer, _cfg(checkpoint_every=6, log_every=4), tmp_path / "cut", on_step=interrupt)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = 6 if len(signals) == 2 else 8
    assert (info.value.step, info.value.checkpoint_step, info.value.signum) == (8, saved, getattr(signal, signals[0]))
    assert read_train_record(tmp_path / "cut" / CHECKPOINT)["step"] == saved
    resumed = make()
    train(resumed, buffer, _cfg(checkpoint_every=6, log_every=4), tmp_path / "cut", resume=True)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_same_seed_gives_bit_identical_weights(tmp_path):
    buffer = ActivationBuffer(torch.randn(300, 8))
    runs = []
    for i, seed in enumerate([5, 5, 6]):
        torch.manual_seed(i)  # the global RNG must not matter
        sae = ExpanderSAE(8, 24, 3, degree=3, seed=seed)
        train(sae, buffer, _cfg(seed=seed), tmp_path / str(i))
        runs.append(sae.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["values"], runs[2]["values"])


def test_dead_threshold_defaults_to_a_fraction_of_the_run(tmp_path):
    sae = TopKSAE(8, 24, 3)
    assert sae.dead_tokens_threshold is None
    cfg = _cfg(dead_fraction=0.25)
    train(sae, ActivationBuffer(torch.randn(300, 8)), cfg, tmp_path)
    assert sae.dead_tokens_threshold == int(0.25 * 12 * 32)


def test_expander_blames_the_parameter_that_broke(tmp_path):
    sae = ExpanderSAE(8, 24, 3, degree=3)
    with pytest.raises(NonFiniteError, match=r"step \d+: (the training loss|parameter \S+) is not finite"):
        train(sae, ActivationBuffer(torch.randn(200, 8)), _cfg(lr=1e30, warmup_steps=0, grad_clip=0.0), tmp_path)
    if (tmp_path / CHECKPOINT).exists():
        assert _all_finite_on_disk(tmp_path)


def test_cosine_schedule_follows_the_half_cosine_after_warm_up():
    import math

    cfg = TrainConfig(lr_schedule="cosine", warmup_steps=10)
    total, base = 110, 3e-4
    assert _lr_at(0, total, base, cfg) == pytest.approx(base / 10)
    for step in (10, 35, 60, 85, 109):
        want = base * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert _lr_at(step, total, base, cfg) == pytest.approx(want)
    assert _lr_at(60, total, base, cfg) == pytest.approx(base / 2)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(ValueError, match="resample_every"):
        TrainConfig(resample_every=-1).validate()


@pytest.mark.parametrize("make", [
    lambda: TopKSAE(16, 40, 2, dead_tokens_threshold=10**9),
    lambda: ExpanderSAE(16, 40, 2, degree=5, tied=False, dead_tokens_threshold=10**9),
], ids=["topk", "expander"])
def test_resampling_reinitialises_dead_latents_and_their_adam_moments(tmp_path, make):
    torch.manual_seed(0)
    buffer = ActivationBuffer(torch.randn(640, 16) * 3 + 1)
    sae = make()
    steps_seen = {}

    def on_step(step, log):
        if step == 4:  # make latents 0..9 dead just before the step-5 resampling
            sae.tokens_since_fired[:10] = 10**9 + 1
            sae.tokens_since_fired[10:] = 0
            with torch.no_grad():
                sae.b_enc[:10] = -1e4  # so that they cannot fire at step 5 either
            steps_seen["params"] = {n: p.detach().clone() for n, p in sae.named_parameters()}

    cfg = TrainConfig(batch_size=64, total_tokens=64 * 7, lr=1e-3, warmup_steps=0, resample_every=5, log_every=1,
                      progress=False)
    result = train(sae, buffer, cfg, tmp_path, on_step=on_step)
    logged = [h for h in result.history if "resampled" in h]
    assert [(h["step"], h["resampled"]) for h in logged] == [(5, 10)]
    # resampled latents got unit atoms, a zero encoder bias at step 5 (trained twice since, no
    # longer -1e4) and their dead counters reset
    assert int(sae.tokens_since_fired[:10].max()) <= 2 * 64 and float(sae.b_enc[:10].detach().abs().max()) < 1
    if isinstance(sae, TopKSAE):
        assert torch.allclose(sae.W_dec[:10].norm(dim=1), torch.ones(10), atol=1e-5)
        # the encoder row started at 0.2 x the live rows' mean norm, far from its old value
        before = steps_seen["params"]["W_enc"][:10]
        assert not torch.allclose(sae.W_enc[:10], before, atol=1e-2)
    else:
        assert not torch.allclose(sae.values[:10], steps_seen["params"]["values"][:10], atol=1e-2)


def test_resampling_with_a_large_seed_trains_to_the_end(tmp_path):
    """The resampling's generator is seeded from (TrainConfig.seed, step): every seed the config
    accepts (below 2**64) must keep it in a torch.Generator's range. A seed of 2**44 (or any past
    ~1.8e13) overflowed it at the first resample step, after that many steps of training."""
    torch.manual_seed(0)
    buffer = ActivationBuffer(torch.randn(512, 16))
    for seed in (2**44, 2**64 - 1):
        cfg = TrainConfig(batch_size=64, total_tokens=64 * 4, resample_every=2, progress=False, seed=seed)
        result = train(TopKSAE(16, 48, 3, dead_tokens_threshold=1), buffer, cfg, tmp_path / str(seed))
        assert result.step == 4


def test_resample_dead_points_atoms_at_the_worst_reconstructed_inputs():
    sae = TopKSAE(8, 24, 2, dead_tokens_threshold=5)
    x = torch.zeros(6, 8)
    x[3] = torch.tensor([0.0, 0, 0, 5, 0, 0, 0, 0]) + 0.1  # the only input far from the decoder's reach
    sae.tokens_since_fired[:] = 0
    sae.tokens_since_fired[[2, 7]] = 6
    with torch.no_grad():
        err = x - sae.decode(*sae.encode(x))
    weights = err.pow(2).sum(-1)
    idx = sae.resample_dead(x, generator=torch.Generator().manual_seed(0))
    assert idx.tolist() == [2, 7] and sae.tokens_since_fired[[2, 7]].tolist() == [0, 0]
    # the picks are drawn in proportion to the squared errors: row 3 dominates here
    assert weights[3] / weights.sum() > 0.9
    want = err[3] / err[3].norm()
    assert torch.allclose(sae.W_dec[2], want, atol=1e-5) or torch.allclose(sae.W_dec[7], want, atol=1e-5)
    assert sae.b_enc[[2, 7]].tolist() == [0.0, 0.0]
    sae.tokens_since_fired[:] = 0
    assert sae.resample_dead(x).numel() == 0


def test_b_dec_init_zero_keeps_b_dec_at_zero_and_untrained(tmp_path):
    torch.manual_seed(0)
    buffer = ActivationBuffer(torch.randn(300, 8) + 4)
    for make in (lambda **o: TopKSAE(8, 20, 2, **o), lambda **o: ExpanderSAE(8, 20, 2, degree=3, **o)):
        sae = make(b_dec_init="zero")
        sae.init_b_dec(buffer[0:300])
        assert not sae.b_dec.requires_grad and bool((sae.b_dec == 0).all())
        train(sae, buffer, TrainConfig(batch_size=50, total_tokens=300, lr=1e-2, progress=False), tmp_path / "z")
        assert bool((sae.b_dec == 0).all())
        (tmp_path / "z" / CHECKPOINT).unlink()
        median = make()
        median.init_b_dec(buffer[0:300])
        assert median.b_dec.requires_grad and torch.allclose(median.b_dec, buffer[0:300].median(0).values)


def test_resample_zeroes_the_adam_moments_of_resampled_latents_only():
    from sae.train import _resample

    sae = ExpanderSAE(16, 30, 2, degree=4, tied=False, dead_tokens_threshold=5)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.randn(50, 16)
    sae(x).loss.backward()
    opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    sae.tokens_since_fired[:] = 0
    sae.tokens_since_fired[[4, 11, 29]] = 6
    assert _resample(sae, opt, x, seed=1) == 3
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            now, old = opt.state[p][key], before[id(p)][key]
            if p.shape[0] == 30:  # per-latent rows: values, enc_values, b_enc
                assert bool((now[[4, 11, 29]] == 0).all())
                keep = torch.ones(30, dtype=torch.bool)
                keep[[4, 11, 29]] = False
                assert torch.equal(now[keep], old[keep])
            else:  # b_dec
                assert torch.equal(now, old)


def test_expander_resampling_allocates_per_support_entry_not_per_model_coordinate():
    """Early in a run nearly every latent is dead, and resampling gathered the picked residual of
    every one of them whole, ``err[pick]`` [dead, d_model]: n * m floats, 8 GiB at n = 2^20,
    m = 2048, of which an Expander SAE reads d per latent. Every latent dead here: no allocation may
    reach twice the [n, d] int64 rows' bytes (the whole gather was 16x them), and the new atoms are
    still the picked residuals on each support, normalised (computed here from the same draws)."""
    m, n, d, B = 512, 8192, 4, 32
    sae = ExpanderSAE(m, n, 4, degree=d, dead_tokens_threshold=5, seed=1)
    sae.tokens_since_fired[:] = 6
    x = torch.randn(B, m, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = x - sae.decode(*sae.encode(x))
    weight = err.pow(2).sum(-1).double()
    pick = torch.multinomial(weight / weight.sum(), n, replacement=True, generator=torch.Generator().manual_seed(3))
    want = torch.stack([err[p, sae.rows[j]] for j, p in enumerate(pick.tolist())])
    want = want / want.norm(dim=1, keepdim=True)
    spy = StorageAllocations()
    with spy:
        idx = sae.resample_dead(x, generator=torch.Generator().manual_seed(3))
    assert idx.numel() == n
    assert spy.largest < 2 * 8 * n * d, (spy.largest, 8 * n * d)
    torch.testing.assert_close(sae.values.detach(), want, rtol=1e-6, atol=1e-6)


def test_adam_is_fused_where_pytorch_has_the_kernel_and_matches_the_default():
    """``adam`` (what ``train`` steps with) is PyTorch's fused Adam for CPU parameters and its
    default implementation on a device without a fused kernel ("meta"); fused, 20 steps of fp32
    parameters stay within a few ulps of the default implementation's."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(33, 17, generator=g), torch.randn(17, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(20)]
    fused_params = [torch.nn.Parameter(p.clone()) for p in start]
    plain_params = [torch.nn.Parameter(p.clone()) for p in start]
    fused = adam(fused_params, 1e-2, (0.9, 0.999), 6.25e-10)
    plain = torch.optim.Adam(plain_params, lr=1e-2, betas=(0.9, 0.999), eps=6.25e-10)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for step in grads:
        for params, opt in ((fused_params, fused), (plain_params, plain)):
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
    for a, b, s in zip(fused_params, plain_params, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not adam([torch.nn.Parameter(torch.empty(3, device="meta"))], 1e-3).defaults["fused"]


def test_a_finished_run_extends_with_more_tokens_or_another_batch_size_when_allowed(tmp_path):
    """The dead threshold the trainer derives from the run's length is not an SAE option a resume
    compares: a longer run or another batch size is a training change, refused or recorded."""
    buffer = ActivationBuffer(torch.randn(300, 8))
    train(TopKSAE(8, 24, 3), buffer, _cfg(), tmp_path)  # 12 steps, to the end
    with pytest.raises(ValueError, match=r"^resume: .*total_tokens 384 -> 800"):
        train(TopKSAE(8, 24, 3), buffer, _cfg(total_tokens=800), tmp_path, resume=True)
    sae = TopKSAE(8, 24, 3)
    result = train(sae, buffer, _cfg(total_tokens=800, batch_size=40), tmp_path, resume=True,
                   allow_config_change=True)
    assert (result.step, result.tokens) == (12 + 11, 384 + 11 * 40)
    assert sae.dead_tokens_threshold == _cfg(total_tokens=800, batch_size=40).dead_tokens()
    metrics = json.loads((tmp_path / METRICS).read_text())
    assert metrics["config_changes"] == [{"step": 12, "changed": {"batch_size": [32, 40], "total_tokens": [384, 800]}}]


@pytest.mark.parametrize("change", [dict(grad_clip=0.5), dict(betas=(0.8, 0.999)), dict(eps=1e-6),
                                    dict(dead_fraction=0.5)])
def test_resume_refuses_changed_optimiser_and_dead_settings_unless_allowed(tmp_path, change):
    buffer = ActivationBuffer(torch.randn(300, 8))
    _run(tmp_path, lambda: TopKSAE(8, 24, 3), buffer, _cfg(), kill_at=7)  # checkpoint at step 6
    (name, value), = change.items()
    with pytest.raises(ValueError, match=rf"^resume: .*{name} "):
        train(TopKSAE(8, 24, 3), buffer, _cfg(**change), tmp_path, resume=True)
    train(TopKSAE(8, 24, 3), buffer, _cfg(**change), tmp_path, resume=True, allow_config_change=True)
    changed = json.loads((tmp_path / METRICS).read_text())["config_changes"][0]["changed"]
    assert list(changed) == [name] and changed[name][1] == (list(value) if isinstance(value, tuple) else value)


def test_train_initialises_a_fresh_sae_from_the_buffer_and_leaves_a_loaded_one(tmp_path):
    from sae.train import INIT_SAMPLE, init_sample

    x = torch.randn(300, 8) * 40 + 7
    buffer = ActivationBuffer(x)
    assert torch.equal(init_sample(buffer), x[torch.randperm(300, generator=torch.Generator().manual_seed(0))])
    assert INIT_SAMPLE >= 300
    cfg = _cfg(lr=1e-12, total_tokens=32)  # one step that barely moves b_dec
    sae = TopKSAE(8, 24, 3, normalize_activations=True)
    train(sae, buffer, cfg, tmp_path / "fresh")
    want = TopKSAE(8, 24, 3, normalize_activations=True)
    want.init_b_dec(x)
    assert torch.equal(sae.act_scale, want.act_scale) and sae.act_scale != 1
    assert torch.allclose(sae.b_dec, want.b_dec, atol=1e-6)
    loaded = TopKSAE(8, 24, 3, normalize_activations=True)
    loaded.load_state_dict(TopKSAE(8, 24, 3, normalize_activations=True).state_dict())  # b_dec 0, act_scale 1
    train(loaded, buffer, cfg, tmp_path / "loaded")
    assert loaded.act_scale == 1 and loaded.b_dec.abs().max() < 1e-6


def test_evaluate_sees_the_sae_in_eval_mode(tmp_path):
    seen = []
    sae = TopKSAE(8, 24, 3, batch_topk=True)
    result = train(sae, ActivationBuffer(torch.randn(300, 8)), _cfg(eval_every=4), tmp_path,
                   evaluate=lambda s: seen.append(s.training) or {"fvu": 0.0})
    assert seen == [False, False, False] and sae.training and result.final == {"fvu": 0.0}


@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_resample_keeps_b_dec_moments_when_n_equals_m(arch):
    from sae.train import _resample

    sae = TopKSAE(16, 16, 2, dead_tokens_threshold=5) if arch == "topk" else \
        ExpanderSAE(16, 16, 2, degree=4, dead_tokens_threshold=5)
    opt = torch.optim.Adam([p for p in sae.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(50, 16) + 3
    sae(x).loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[sae.b_dec].items()}
    sae.tokens_since_fired[:] = 0
    sae.tokens_since_fired[[3, 7, 11]] = 6
    assert _resample(sae, opt, x, seed=1) == 3
    assert all(torch.equal(opt.state[sae.b_dec][k], v) for k, v in before.items())
    assert bool((opt.state[sae.b_enc]["exp_avg"][[3, 7, 11]] == 0).all())


def test_resume_refuses_another_dtype(tmp_path):
    buffer = ActivationBuffer(torch.randn(300, 8))
    _run(tmp_path, lambda: TopKSAE(8, 24, 3, dtype=torch.bfloat16), buffer, _cfg(), kill_at=4)
    with pytest.raises(CheckpointError, match=r"W_enc in torch.bfloat16, the SAE to resume is torch.float32"):
        train(TopKSAE(8, 24, 3), buffer, _cfg(), tmp_path, resume=True)
    result = train(TopKSAE(8, 24, 3, dtype=torch.bfloat16), buffer, _cfg(), tmp_path, resume=True)
    assert result.step == 12


# -- checkpoints that verify but do not fit, a kill mid-write, an SAE option left out on resume ----

def _rewritten(path, edit, name):
    """A copy of checkpoint ``path`` with its tensors changed by ``edit(tensors)`` and every checksum
    recomputed: a file that verifies (as one written by another version of the package would) but
    does not fit the SAE it names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sae.checkpoint import FORMAT, HEADER_DIGEST, header_sha256, tensor_sha256

    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()[FORMAT])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    record["sha256"] = {k: tensor_sha256(v) for k, v in sorted(tensors.items())}
    record[HEADER_DIGEST] = header_sha256(record)
    out = path.with_name(name)
    save_file(tensors, str(out), metadata={FORMAT: json.dumps(record)})
    return out


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("b_enc"), r"missing \['b_enc'\]"),
    (lambda t: t.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
    (lambda t: t.update(b_enc=torch.zeros(21)), r"b_enc has shape \(21,\)"),
    (lambda t: t.pop("optimizer.0.exp_avg"), r"optimizer state"),
    (lambda t: t.update({"optimizer.0.exp_avg": torch.zeros(3, 3)}), r"optimizer tensor 0\.exp_avg has shape \(3, 3\)"),
    (lambda t: t.update({"optimizer.9.exp_avg": torch.zeros(3)}), r"optimizer tensor 9\.exp_avg"),
    (lambda t: t.update({"optimizer.x": torch.zeros(3)}), r"optimizer tensor x"),
    # TopKSAE(8, 20, 2) has 4 parameters (W_enc [20, 8], b_enc, decoder.weight, decoder.bias)
    (lambda t: t.update({"optimizer.4.exp_avg": torch.zeros(8)}), r"optimizer tensor 4\.exp_avg: expected "
                                                                  r"<parameter index below 4>"),
    (lambda t: t.update({"optimizer.0.": torch.zeros(20, 8)}), r"optimizer tensor 0\.: expected"),
    (lambda t: t.update({"optimizer.0": torch.zeros(20, 8)}), r"optimizer tensor 0: expected"),
    (lambda t: t.pop("optimizer.0.exp_avg_sq"), r"optimizer state holds different keys"),
    (lambda t: t.update({"optimizer.0.exp_avg_sq": torch.zeros(20, 8)[:3]}), r"optimizer tensor 0\.exp_avg_sq has "
                                                                             r"shape \(3, 8\)"),
    (lambda t: t.update({"optimizer.0.exp_avg": torch.zeros(8, 20)}), r"optimizer tensor 0\.exp_avg has shape "
                                                                      r"\(8, 20\); its parameter has \(20, 8\)"),
], ids=["missing-tensor", "extra-tensor", "tensor-shape", "missing-moment", "moment-shape", "no-such-parameter",
        "bad-name", "index-one-past", "empty-key", "no-key", "missing-second-moment", "second-moment-shape",
        "moment-transposed"])
def test_a_checkpoint_that_verifies_but_does_not_fit_is_a_checkpoint_error(tmp_path, edit, match):
    """load_sae refuses such a file with a CheckpointError naming it; resuming from it must too, not
    with load_state_dict's RuntimeError, a KeyError, or Adam moments of another shape that the fused
    step would silently turn into NaN."""
    path = _rewritten(_trained(tmp_path), edit, "edited.safetensors")
    sae = TopKSAE(8, 20, 2, dead_tokens_threshold=50)
    if "optimizer" not in match:  # the reference: the loader of final SAEs refuses the same file
        with pytest.raises(CheckpointError):
            load_sae(path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint: {path}.*{match}"):
        load_checkpoint(path, sae, adam([p for p in sae.parameters() if p.requires_grad], 1e-3))


def _poisoned(name, value):
    """An edit for ``_rewritten``: one element in the middle of tensor ``name`` set to ``value`` (a
    check of the first or last element only would miss it)."""
    def edit(tensors):
        t = tensors[name].clone()
        t.view(-1)[t.numel() // 2] = value
        tensors[name] = t
    return edit


@pytest.mark.parametrize("name,value,named", [
    ("W_enc", float("nan"), r"tensor W_enc"),
    ("decoder.bias", float("-inf"), r"tensor decoder\.bias"),
    ("optimizer.0.exp_avg", float("nan"), r"optimizer tensor 0\.exp_avg \(the state of W_enc\)"),
    ("optimizer.2.exp_avg_sq", float("inf"), r"optimizer tensor 2\.exp_avg_sq \(the state of decoder\.weight\)"),
    ("optimizer.1.step", float("nan"), r"optimizer tensor 1\.step \(the state of b_enc\)"),
], ids=["nan-weight", "inf-bias", "nan-moment", "inf-second-moment", "nan-step"])
def test_a_checkpoint_with_a_non_finite_tensor_is_refused(tmp_path, name, value, named):
    """A checkpoint that verifies but holds a NaN or inf parameter or Adam state: resuming from it
    used to go on and give NaN weights within two steps (then a NonFiniteError blaming the data or
    the learning rate), or, for an infinite exp_avg_sq, freeze that weight for good without a word;
    loading refuses it with a CheckpointError naming the file and the tensor."""
    path = _rewritten(_trained(tmp_path), _poisoned(name, value), "poisoned.safetensors")
    kind = "nan" if value != value else "inf"
    sae = TopKSAE(8, 20, 2, dead_tokens_threshold=50)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    optimizer = adam([p for p in sae.parameters() if p.requires_grad], 1e-3)
    with pytest.raises(CheckpointError, match=rf"^checkpoint: {path} .*{named} is not finite \(it holds {kind}\)"):
        load_checkpoint(path, sae, optimizer)
    assert all(torch.equal(v, before[k]) for k, v in sae.state_dict().items())  # refused before loading
    assert not optimizer.state
    if not name.startswith("optimizer."):
        with pytest.raises(CheckpointError, match=rf"^checkpoint: {path} {named} is not finite"):
            load_sae(path)
    # and a run resumed from it stops there, before any step
    path.replace(path.with_name(CHECKPOINT))
    with pytest.raises(CheckpointError, match=named):
        train(TopKSAE(8, 20, 2), ActivationBuffer(torch.randn(300, 8)),
              TrainConfig(batch_size=50, total_tokens=400, checkpoint_every=2, progress=False), tmp_path,
              resume=True, allow_config_change=True)  # 4 more steps than the finished run's


def test_a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing_written_before(tmp_path):
    """SIGKILL while the second checkpoint is half written: the first one is intact, the half file
    is a temp file the next start removes, and the resumed run ends on the uninterrupted run's
    weights, bit for bit."""
    import os
    import signal

    script = textwrap.dedent("""
        import os, signal, sys, torch
        import safetensors.torch as st
        from sae.data import ActivationBuffer
        from sae.models import TopKSAE
        from sae.train import TrainConfig, train
        out, kill = sys.argv[1], sys.argv[2] == "kill"
        real, calls = st.save_file, []
        def save_file(tensors, filename, metadata=None):
            calls.append(filename)
            if kill and len(calls) == 2:  # half of the second checkpoint on disk, then killed
                real(tensors, filename, metadata=metadata)
                with open(filename, "r+b") as f:
                    f.truncate(os.path.getsize(filename) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            real(tensors, filename, metadata=metadata)
        st.save_file = save_file
        buffer = ActivationBuffer(torch.randn(300, 8, generator=torch.Generator().manual_seed(0)))
        cfg = TrainConfig(batch_size=32, total_tokens=32 * 12, lr=1e-3, warmup_steps=2, checkpoint_every=3,
                          log_every=1, progress=False)
        train(TopKSAE(8, 24, 3), buffer, cfg, out, resume=os.path.exists(os.path.join(out, "checkpoint.safetensors")))
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def child(out, mode):
        return subprocess.run([sys.executable, "-c", script, str(out), mode], env=env, capture_output=True, text=True,
                              timeout=300)

    killed = child(tmp_path / "run", "kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT).train["step"] == 3
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # the half-written one
    for out, mode in ((tmp_path / "run", "resume"), (tmp_path / "full", "plain")):
        done = child(out, mode)
        assert done.returncode == 0, done.stderr[-2000:]
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    resumed, full = read_checkpoint(tmp_path / "run" / CHECKPOINT), read_checkpoint(tmp_path / "full" / CHECKPOINT)
    assert resumed.train["step"] == full.train["step"] == 12
    for name, tensor in full.sae_tensors.items():
        assert torch.equal(resumed.sae_tensors[name], tensor), name
    for name, tensor in full.optimizer_tensors.items():
        assert torch.equal(resumed.optimizer_tensors[name], tensor), name


def test_resume_refuses_to_drop_an_sae_s_own_dead_threshold(tmp_path):
    """An SAE trained with an explicit dead_tokens_threshold resumed as one without (None: derive it
    from the run) would go on with another threshold than the uninterrupted run; refused, like any
    other changed SAE option. A derived threshold still resumes as None."""
    buffer = ActivationBuffer(torch.randn(300, 8))
    derived = _cfg().dead_tokens()
    assert derived != 40
    _run(tmp_path / "set", lambda: TopKSAE(8, 24, 3, dead_tokens_threshold=40), buffer, _cfg(), kill_at=7)
    sae = TopKSAE(8, 24, 3)
    with pytest.raises(CheckpointError, match=r"dead_tokens_threshold=40"):
        train(sae, buffer, _cfg(), tmp_path / "set", resume=True)
    sae = TopKSAE(8, 24, 3, dead_tokens_threshold=40)
    train(sae, buffer, _cfg(), tmp_path / "set", resume=True)
    assert sae.dead_tokens_threshold == 40
    _run(tmp_path / "derived", lambda: TopKSAE(8, 24, 3), buffer, _cfg(), kill_at=7)
    sae = TopKSAE(8, 24, 3)
    train(sae, buffer, _cfg(), tmp_path / "derived", resume=True)
    assert sae.dead_tokens_threshold == derived


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_parameter_check_stops_on_a_non_finite_one_without_a_temporary_of_its_size(value):
    """The check at every log step names the parameter that is not finite (NaN, +inf or -inf in the
    middle of it), and allocates nothing of a parameter's size: ``isfinite(p).all()`` wrote about
    1.8x the largest parameter's bytes (its abs, then two masks), at every log step."""
    from sae.train import _FiniteWatch

    sae = TopKSAE(64, 1024, 4)
    watch = _FiniteWatch(sae, torch.device("cpu"))
    spy = StorageAllocations()
    with spy:
        watch.check(5, 3)  # all finite: nothing to say
    largest = max(p.numel() * p.element_size() for p in sae.parameters())
    assert spy.largest < largest // 100, (spy.largest, largest)
    params = dict(sae.named_parameters())
    with torch.no_grad():
        params["decoder.weight"].view(-1)[params["decoder.weight"].numel() // 2] = value
    with pytest.raises(NonFiniteError, match=r"^step 5: parameter decoder\.weight is not finite\. Nothing after "
                                             r"step 3 was written\."):
        watch.check(5, 3)


def test_an_overflowing_adam_moment_stops_training_before_the_checkpoint_it_would_spoil(tmp_path):
    """No gradient clipping, and at step 5 one gradient too large to square in fp32 (b_enc's, scaled
    by 1e30 in a gradient hook): its exp_avg_sq is inf, which freezes those weights while they and
    the loss stay finite. The trainer wrote that state at the next checkpoint (step 6), over the
    good one, and the loader refuses it: the run could not be resumed. It now stops at step 6 with
    a NonFiniteError naming the state, and the step-3 checkpoint resumes to the end."""
    buffer = ActivationBuffer(torch.randn(200, 8))
    sae, done = TopKSAE(8, 24, 3), [0]
    sae.b_enc.register_hook(lambda grad: grad * 1e30 if done[0] == 4 else grad)

    def on_step(step, log):
        done[0] = step

    cfg = _cfg(grad_clip=0.0)  # checkpoints at steps 3, 6, 9, 12
    with pytest.raises(NonFiniteError, match=r"^step 6: the Adam state exp_avg_sq of b_enc is not finite, so a "
                                             r"checkpoint of it could not be resumed\. Nothing after step 3 was "
                                             r"written\."):
        train(sae, buffer, cfg, tmp_path, on_step=on_step)
    assert all(bool(torch.isfinite(p).all()) for p in sae.parameters())  # the weights never showed it
    assert read_train_record(tmp_path / CHECKPOINT)["step"] == 3
    result = train(TopKSAE(8, 24, 3), buffer, cfg, tmp_path, resume=True)
    assert result.step == 12


def test_a_signal_stop_does_not_checkpoint_a_non_finite_adam_state(tmp_path):
    """The stop asked by SIGTERM writes a checkpoint at the step in hand; with an Adam moment that
    overflowed (weights and loss still finite, as above) that checkpoint could not be resumed, so
    the stop is a NonFiniteError naming the state and the step-3 checkpoint stays."""
    import os
    import signal

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    buffer = ActivationBuffer(torch.randn(200, 8))
    sae, done = TopKSAE(8, 24, 3), [0]
    sae.b_enc.register_hook(lambda grad: grad * 1e30 if done[0] == 4 else grad)

    def on_step(step, log):
        done[0] = step
        if step == 5:  # not a checkpoint step (3, 6, 9, 12): only the stop's own checkpoint is at stake
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(NonFiniteError, match=r"^step 5: the Adam state exp_avg_sq of b_enc is not finite.* "
                                             r"Nothing after step 3 was written\."):
        train(sae, buffer, _cfg(grad_clip=0.0), tmp_path, on_step=on_step)
    assert read_train_record(tmp_path / CHECKPOINT)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_watch_reports_the_first_step_whose_loss_was_not_finite():
    """On CUDA the loss flag is read only at log steps: the error must name the first bad step, not
    the last one recorded before the read."""
    from sae.train import _FiniteWatch

    watch = _FiniteWatch(TopKSAE(8, 24, 3), torch.device("cpu"))
    for step, loss in [(1, 0.5), (2, float("nan")), (3, 0.4), (4, float("inf"))]:
        watch.record(step, torch.tensor(loss))
    with pytest.raises(NonFiniteError, match=r"^step 2: the training loss is not finite\. Nothing after step 0 "):
        watch.check(4, 0, params=False)


def test_resumed_state_does_not_change_when_the_checkpoint_is_rewritten_in_place(tmp_path):
    """safetensors hands out views of its mapping of the file: the Adam moments a resume loaded stayed
    backed by the checkpoint (overwritten in place, they changed; cut short, SIGBUS). They own their
    memory, as the SAE's tensors do."""
    buffer = ActivationBuffer(torch.randn(200, 8))
    train(TopKSAE(8, 24, 3, dead_tokens_threshold=32), buffer, _cfg(total_tokens=32 * 3), tmp_path)
    sae = TopKSAE(8, 24, 3, dead_tokens_threshold=32)
    optimizer = adam([p for p in sae.parameters() if p.requires_grad], 1e-3)
    load_checkpoint(tmp_path / CHECKPOINT, sae, optimizer)
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    weights = {k: v.clone() for k, v in sae.state_dict().items()}
    path = tmp_path / CHECKPOINT
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the same size, every byte past the header zeroed, in place
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(size - header))
    assert before and all(torch.equal(v, before[id(p)][k]) for p, s in optimizer.state.items() for k, v in s.items())
    assert all(torch.equal(v, weights[k]) for k, v in sae.state_dict().items())


@pytest.mark.parametrize("first,second", [
    (lambda: TopKSAE(8, 24, 3, normalize_activations=True).bfloat16(),
     lambda: TopKSAE(8, 24, 3, normalize_activations=True, dtype=torch.bfloat16)),
    (lambda: TopKSAE(8, 24, 3, normalize_activations=True, dtype=torch.bfloat16),
     lambda: TopKSAE(8, 24, 3, normalize_activations=True).bfloat16()),
], ids=["cast-then-built", "built-then-cast"])
def test_resume_takes_the_buffers_of_an_sae_built_in_its_dtype_or_cast_to_it(tmp_path, first, second):
    """``TopKSAE(dtype=bf16)`` keeps its floating buffers (act_scale, batch_threshold) in fp32, a cast
    ``.bfloat16()`` casts them: the same parameters either way, so either resumes the other's run
    (it was refused as 'build it with dtype=torch.bfloat16', which it was). The buffers keep the
    resuming SAE's dtypes and take the checkpoint's values; the run ends as the uninterrupted one."""
    buffer = ActivationBuffer(torch.randn(300, 8) * 4 + 1)
    torch.manual_seed(0)
    _run(tmp_path / "killed", first, buffer, _cfg(), kill_at=4)
    sae = second()
    dtypes = {name: t.dtype for name, t in sae.state_dict().items()}
    result = train(sae, buffer, _cfg(), tmp_path / "killed", resume=True)
    assert result.step == 12
    assert {name: t.dtype for name, t in sae.state_dict().items()} == dtypes
    assert float(sae.act_scale) != 1  # the checkpoint's scale (from data), not a fresh SAE's
    with pytest.raises(CheckpointError, match=r"W_enc in torch.bfloat16, the SAE to resume is torch.float32"):
        train(TopKSAE(8, 24, 3, normalize_activations=True), buffer, _cfg(), tmp_path / "killed", resume=True)
