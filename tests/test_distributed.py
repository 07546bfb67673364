"""Distributed training (``sae.train`` with ``TrainConfig.parallel``, ``sae.distributed``) on 2 gloo
processes spawned here, against one process.

One spawn (module fixture) runs every 2-process scenario and leaves its results on disk; the tests
compare them with a single-process reference loop written below (same Adam, schedule, clipping and
decoder constraints as ``sae.train``). Data parallel and latent-sharded training must give the
single-process losses within 1e-5 relative, step by step, and the same weights; one step's
gradients equal one process's; a killed run resumes to the same weights (on 2 processes or on
one), a created sharded one without any rank allocating a whole [n, *] tensor; a held run
directory, a non-finite step, changed settings on resume and a bad checkpoint stop both ranks; a
sharded checkpoint loads in one process and reproduces the outputs, and a single-process file
reshards unevenly; an Expander whose shards cannot cover m on their own (n/P * degree < m) creates,
steps, saves and reshards like one process; the bytes communicated per step equal the formula,
with no [B, n] tensor among them. The last tests launch ``python -m sae train`` through torchrun on
a tiny random Llama and load its checkpoint in one process, and parse the README's torchrun commands.
"""

import contextlib
import functools
import math
import os
import re
import shutil
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from sae.data import ActivationBuffer
from sae.distributed import communication_per_step
from sae.models import ExpanderSAE, TopKSAE
from sae.train import CHECKPOINT, TrainConfig, _lr_at, adam, load_checkpoint, train

WORLD = 2
M, N, K, DEGREE = 16, 96, 4, 4        # each rank holds 48 latents > m: a [B, n/P] tensor would stand out
BATCH, STEPS = 32, 30
ACTS_PENALTY = 0.01
TIMEOUT_S = 240


def _make(arch):
    kwargs = dict(dead_tokens_threshold=64, backend="torch")  # AuxK turns on after a few steps
    torch.manual_seed(0)
    if arch == "topk":
        return TopKSAE(M, N, K, **kwargs)
    return ExpanderSAE(M, N, K, degree=DEGREE, seed=3, **kwargs)


def _supported_options() -> dict:
    """The optional model features to test, those this version of sae.models knows."""
    wanted = {"signed-residual": dict(signed=True, auxk_norm="residual", normalize_activations=True),
              "normalized-topk": dict(normalize_activations=True)}
    try:
        ExpanderSAE(M, N, K, degree=DEGREE, **wanted["signed-residual"])
    except TypeError:  # a version without these options
        return {}
    return wanted


_OPTIONS = _supported_options()


def _make_optioned(name, x):
    options = dict(_OPTIONS[name], dead_tokens_threshold=10, backend="torch")
    sae = ExpanderSAE(M, N, K, degree=DEGREE, seed=2, **options) if name.startswith("signed") else \
        TopKSAE(M, N, K, **options)
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    sae.tokens_since_fired[::2] = 100  # half dead: AuxK on
    return sae


_AUXK_DEAD = [3, 20, 47, 50, 71]  # 5 dead latents < k_aux = m / 2 = 8; rank 0 holds 3, rank 1 holds 2
_AUXK_GRID = [f"{arch}-{norm}-{'normalized' if normalize else 'raw'}" for arch in ("topk", "expander")
              for norm in ("variance", "residual") for normalize in (False, True)]


def _make_auxk(name, x):
    arch, norm, scaling = name.split("-")
    options = dict(auxk_norm=norm, normalize_activations=scaling == "normalized", dead_tokens_threshold=10,
                   backend="torch")
    sae = TopKSAE(M, N, K, **options) if arch == "topk" else ExpanderSAE(M, N, K, degree=DEGREE, seed=2, **options)
    sae.init_b_dec(x)  # act_scale != 1 with normalize_activations: x is 2 * randn + 0.5
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    sae.tokens_since_fired[_AUXK_DEAD] = 100
    return sae


def _buffer():
    return ActivationBuffer(torch.randn(400, M, generator=torch.Generator().manual_seed(1)) * 2 + 0.5)


def _cfg(**kw):
    return TrainConfig(**dict(dict(batch_size=BATCH, total_tokens=BATCH * STEPS, lr=3e-3, warmup_steps=4,
                                   checkpoint_every=5, log_every=1, progress=False), **kw))


# ---------------------------------------------------------------------------------------------
# The single-process reference
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _reference(arch):
    return _reference_from(_make(arch))


def _reference_from(sae):
    """Plain loop on one process: (per-step fvu and auxk_loss, final state_dict)."""
    buffer, cfg = _buffer(), _cfg()
    if getattr(sae, "_fresh", False):  # as train() does for an SAE as constructed
        from sae.train import init_sample

        sae.init_b_dec(init_sample(buffer))
    params = [p for p in sae.parameters() if p.requires_grad]
    optimizer = adam(params, cfg.lr, cfg.betas, cfg.eps)  # the trainer's Adam
    total = cfg.steps()
    batches = buffer.batches(cfg.batch_size, -(-total // buffer.steps_per_epoch(cfg.batch_size)), seed=cfg.seed)
    fvu, auxk = [], []
    sae.train()
    for step in range(total):
        output = sae(next(batches))
        optimizer.zero_grad()
        output.loss.backward()
        touched = output.top_indices.reshape(-1)
        if output.auxk_indices is not None:
            touched = torch.cat([touched, output.auxk_indices.reshape(-1)])
        sae.remove_parallel_grads(touched)
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, cfg.lr, cfg)
        optimizer.step()
        sae.normalize_decoder()
        fvu.append(float(output.fvu.detach()))
        auxk.append(None if output.auxk_loss is None else float(output.auxk_loss.detach()))
    return fvu, auxk, sae.state_dict()


# ---------------------------------------------------------------------------------------------
# The 2-process scenarios (run in the spawned workers)
# ---------------------------------------------------------------------------------------------

class _Killed(Exception):
    pass


def _scenarios(rank, world, out):
    import sae.distributed as sd

    x_eval = torch.randn(10, M, generator=torch.Generator().manual_seed(7))
    for mode in ("data", "latent"):
        for arch in ("topk", "expander"):
            name = f"{mode}-{arch}"
            result = train(_make(arch), _buffer(), _cfg(parallel=mode), out / name)
            model = result.model
            if mode == "latent":
                model.save(out / f"{name}.safetensors")
                model.eval()
                with torch.no_grad():
                    outputs = model(x_eval)
                model = model.to_model()
                if rank == 0:
                    torch.save({"x": x_eval, "x_hat": outputs.x_hat, "top_acts": outputs.top_acts,
                                "top_indices": outputs.top_indices}, out / f"{name}.outputs.pt")
            if rank == 0:
                torch.save({"history": result.history, "state": model.state_dict()}, out / f"{name}.pt")

    # created sharded (no full model anywhere), trained; its initial state gathered for the reference
    created = sd.LatentShardedSAE.create(ExpanderSAE, _make("expander").config(), seed=4)
    initial = created.full_state_dict()
    result = train(created, _buffer(), _cfg(parallel="latent"), out / "created")
    assert result.model is created
    final = created.to_model()
    if rank == 0:
        torch.save({"initial": initial, "history": result.history, "state": final.state_dict()}, out / "created.pt")

    # kill at step 13 (last checkpoint at 10), then resume on 2 processes
    for mode in ("data", "latent"):
        def kill(step, log):
            if step == 13:
                raise _Killed

        try:
            train(_make("topk"), _buffer(), _cfg(parallel=mode), out / f"killed-{mode}", on_step=kill)
        except _Killed:
            pass
        if rank == 0:  # for resuming in one process
            shutil.copytree(out / f"killed-{mode}", out / f"killed-{mode}-copy")
        torch.manual_seed(1234 + rank)  # the resumed run must not depend on the fresh model's initialisation
        fresh = TopKSAE(M, N, K, dead_tokens_threshold=64, backend="torch")
        result = train(fresh, _buffer(), _cfg(parallel=mode), out / f"killed-{mode}", resume=True)
        model = result.model.to_model() if mode == "latent" else result.model
        if rank == 0:
            torch.save({"history": result.history, "state": model.state_dict()}, out / f"resumed-{mode}.pt")

    # re-shard: a single-process file with an odd latent count, read as 2 uneven shards (25 + 24)
    if rank == 0:
        torch.manual_seed(5)
        single = ExpanderSAE(M, 49, K, degree=DEGREE, seed=11, backend="torch")
        with torch.no_grad():
            single.b_enc.normal_(0, 0.1)
            single.b_dec.normal_(0, 0.1)
        single.save(str(out / "single.safetensors"))
        # 7 latents, k = 4: rank 1's 3 latents give fewer than k candidates (padded)
        TopKSAE(M, 7, K, backend="torch").save(str(out / "narrow.safetensors"))
    torch.distributed.barrier()
    for name in ("single", "narrow"):
        sharded = sd.load_sharded(out / f"{name}.safetensors").eval()
        with torch.no_grad():
            outputs = sharded(x_eval)
        if rank == 0:
            torch.save({"x_hat": outputs.x_hat, "top_acts": outputs.top_acts, "top_indices": outputs.top_indices,
                        "latents": sharded.hi - sharded.lo}, out / f"resharded-{name}.pt")

    # one step, counted: latent-sharded with AuxK active, then data parallel; gradients kept for the
    # reference (the top_acts term has a consumer replicated on every rank, unlike the decoder)
    x = _buffer()[list(range(BATCH))]
    sae = _make("topk")
    sae.tokens_since_fired.fill_(10**6)  # every latent dead: AuxK active with k_aux = m / 2
    sharded = sd.LatentShardedSAE.from_model(sae)
    with sd.count_communication() as log:
        output = sharded(x)
        (output.loss + ACTS_PENALTY * output.top_acts.sum()).backward()
        grads = {name: p.grad.clone() for name, p in sharded.shard.named_parameters()}
        norm = sharded.clip_grad_norm_(1.0)
    saved = {"latent": [(r.op, r.shape, r.bytes) for r in log.records], "latent_grads": grads,
             "latent_range": (sharded.lo, sharded.hi), "latent_norm": float(norm)}
    sae = _make("expander")
    sae.tokens_since_fired[::2] = 10**6  # half the latents dead: AuxK on, normalised by the global variance
    dp = sd.DataParallel(sae)
    with sd.count_communication() as log:
        x_local = dp.local_rows(x)
        loss, _ = dp.objective(x_local, sae(x_local))
        loss.backward()
        dp.sum_gradients()
        dp.merge_dead_counts(x_local.shape[0])
    saved.update(data=[(r.op, r.shape, r.bytes) for r in log.records],
                 data_grads={name: p.grad.clone() for name, p in sae.named_parameters()},
                 data_counts=sae.tokens_since_fired.clone())
    torch.save(saved, out / f"step.rank{rank}.pt")

    # one step with the models' optional features, where this version of sae.models has them
    if _OPTIONS:
        x = _buffer()[list(range(BATCH))]
        steps = {}
        for name, options in _OPTIONS.items():
            sae = _make_optioned(name, x)
            sharded = sd.LatentShardedSAE.from_model(sae)
            output = sharded(x)
            (output.loss + ACTS_PENALTY * output.top_acts.abs().sum()).backward()
            dp_sae = _make_optioned(name, x)
            dp = sd.DataParallel(dp_sae)
            x_local = dp.local_rows(x)
            loss, logged = dp.objective(x_local, dp_sae(x_local))
            loss.backward()
            dp.sum_gradients()
            steps[name] = {"latent_x_hat": output.x_hat.detach(), "latent_auxk": output.auxk_loss.detach(),
                           "latent_grads": {n: p.grad.clone() for n, p in sharded.shard.named_parameters()},
                           "latent_range": (sharded.lo, sharded.hi), "data_fvu": logged["fvu"],
                           "data_auxk": logged["auxk_loss"],
                           "data_grads": {n: p.grad.clone() for n, p in dp_sae.named_parameters()}}
        torch.save(steps, out / f"options.rank{rank}.pt")

    # one step per AuxK normalisation, with and without normalize_activations, with fewer dead
    # latents than k_aux (spread over both ranks): latent-sharded and data parallel
    x = _buffer()[list(range(BATCH))]
    grid = {}
    for name in _AUXK_GRID:
        sae = _make_auxk(name, x)
        sharded = sd.LatentShardedSAE.from_model(sae)
        output = sharded(x)
        output.loss.backward()
        dp_sae = _make_auxk(name, x)
        dp = sd.DataParallel(dp_sae)
        _, logged = dp.objective(dp.local_rows(x), dp_sae(dp.local_rows(x)))
        grid[name] = {"latent_auxk": output.auxk_loss.detach(), "latent_sq": output.auxk_sq_error.detach(),
                      "latent_grads": {n: p.grad.clone() for n, p in sharded.shard.named_parameters()},
                      "latent_range": (sharded.lo, sharded.hi), "data_auxk": logged["auxk_loss"],
                      "data_loss": logged["loss"]}
    torch.save(grid, out / f"auxk-grid.rank{rank}.pt")


    # the reliability of sae.train on every rank: a run directory held by another process, a
    # non-finite step, and changed settings on resume stop every rank (none waits in a collective)
    outcomes = {}

    def outcome(name, fn):
        try:
            fn()
            outcomes[name] = None
        except Exception as exc:  # noqa: BLE001 - the test inspects which error each rank raised
            outcomes[name] = (type(exc).__name__, str(exc))

    outcome("locked", lambda: train(_make("topk"), _buffer(), _cfg(parallel="data"), out / "locked"))
    for mode in ("data", "latent"):
        outcome(f"huge-lr-{mode}", lambda: train(_make("topk"), _buffer(),
                                                 _cfg(parallel=mode, lr=1e30, warmup_steps=0, grad_clip=0.0),
                                                 out / f"huge-lr-{mode}"))
    if rank == 0:
        shutil.copytree(out / "killed-latent", out / "extended")
    torch.distributed.barrier()
    outcome("changed", lambda: train(_make("topk"), _buffer(), _cfg(parallel="latent", lr=1e-3), out / "extended",
                                     resume=True))
    longer = _cfg(parallel="latent", total_tokens=BATCH * (STEPS + 3))
    outcome("allowed", lambda: train(_make("topk"), _buffer(), longer, out / "extended", resume=True,
                                     allow_config_change=True))
    torch.save(outcomes, out / f"outcomes.rank{rank}.pt")


def _entry(rank, world, port, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        _scenarios(rank, world, out)
        torch.distributed.barrier()  # as sae.cli does: neither rank leaves while the other still works
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Spawn 2 gloo processes that run every scenario; fail (never hang) after TIMEOUT_S."""
    import torch.multiprocessing as mp

    from sae.rundir import RunLock

    out = tmp_path_factory.mktemp("dist")
    with RunLock(out / "locked"):  # another process holds this run directory throughout
        context = mp.start_processes(_entry, args=(WORLD, _free_port(), out), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not context.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
    return out


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def _assert_same_training(run, reference):
    fvu, auxk, state = reference
    history = run["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    got_fvu = torch.tensor([h["fvu"] for h in history], dtype=torch.float64)
    torch.testing.assert_close(got_fvu, torch.tensor(fvu, dtype=torch.float64), rtol=1e-5, atol=0)
    assert [h["auxk_loss"] is None for h in history] == [a is None for a in auxk]
    assert any(a is not None for a in auxk), "AuxK never ran: the test would not cover it"
    got_aux = torch.tensor([h["auxk_loss"] for h in history if h["auxk_loss"] is not None], dtype=torch.float64)
    torch.testing.assert_close(got_aux, torch.tensor([a for a in auxk if a is not None], dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert run["state"].keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(run["state"][name].float(), value.float(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "expander"])
@pytest.mark.parametrize("mode", ["data", "latent"])
def test_two_processes_train_like_one(runs, mode, arch):
    _assert_same_training(torch.load(runs / f"{mode}-{arch}.pt"), _reference(arch))


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_killed_two_process_run_resumes_to_the_same_weights(runs, mode):
    meta = load_checkpoint(runs / f"killed-{mode}" / CHECKPOINT, TopKSAE(M, N, K, dead_tokens_threshold=64,
                                                                         backend="torch"))
    assert meta["step"] == STEPS  # the resumed run finished and its checkpoint loads in one process
    _assert_same_training(torch.load(runs / f"resumed-{mode}.pt"), _reference("topk"))


def test_created_sharded_expander_has_the_global_graph_and_trains_like_one_process(runs):
    from sae.masks import expander_mask

    run = torch.load(runs / "created.pt")
    initial = run["initial"]
    assert torch.equal(initial["rows"], expander_mask(M, N, DEGREE, seed=3))
    torch.testing.assert_close(initial["values"].norm(dim=1), torch.ones(N))
    assert not torch.equal(initial["values"][: N // 2], initial["values"][N // 2:])  # ranks drew different values
    sae = _make("expander")
    sae.load_state_dict(initial)
    sae._fresh = True  # as created: train() first sets b_dec from the data, as for a full SAE
    _assert_same_training(run, _reference_from(sae))


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_two_process_checkpoint_resumes_in_one_process(runs, mode, tmp_path):
    shutil.copytree(runs / f"killed-{mode}-copy", tmp_path / "run")
    sae = _make("topk")
    result = train(sae, _buffer(), _cfg(), tmp_path / "run", resume=True)
    assert result.step == STEPS
    _assert_same_training({"history": result.history, "state": sae.state_dict()}, _reference("topk"))


@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_sharded_checkpoint_loads_in_one_process(runs, arch):
    cls = TopKSAE if arch == "topk" else ExpanderSAE
    model = cls.load(str(runs / f"latent-{arch}.safetensors")).eval()
    trained = torch.load(runs / f"latent-{arch}.pt")["state"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name
    sharded = torch.load(runs / f"latent-{arch}.outputs.pt")
    with torch.no_grad():
        out = model(sharded["x"])
    torch.testing.assert_close(sharded["x_hat"], out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded["top_acts"], out.top_acts, rtol=1e-5, atol=1e-6)
    active = out.top_acts > 0
    assert torch.equal(sharded["top_indices"][active], out.top_indices[active])


@pytest.mark.parametrize("name, latents", [("single", 25), ("narrow", 4)])
def test_single_process_file_reshards_unevenly(runs, name, latents):
    single = (ExpanderSAE if name == "single" else TopKSAE).load(str(runs / f"{name}.safetensors")).eval()
    sharded = torch.load(runs / f"resharded-{name}.pt")
    assert sharded["latents"] == latents  # rank 0's share of 49 (or 7) latents over 2 ranks
    with torch.no_grad():
        out = single(torch.randn(10, M, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(sharded["x_hat"], out.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded["top_acts"], out.top_acts, rtol=1e-5, atol=1e-6)
    active = out.top_acts > 0
    assert torch.equal(sharded["top_indices"][active], out.top_indices[active])


def _outcomes(runs, name):
    return [torch.load(runs / f"outcomes.rank{rank}.pt")[name] for rank in range(WORLD)]


def test_run_directory_held_elsewhere_stops_every_rank(runs):
    (lead, lead_message), (other, other_message) = _outcomes(runs, "locked")
    assert lead == "RunLockedError" and "is in use by" in lead_message
    assert other == "RuntimeError" and "locking out_dir failed on another rank" in other_message
    assert not (runs / "locked" / CHECKPOINT).exists()


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_non_finite_step_stops_every_rank_and_disk_stays_finite(runs, mode):
    from safetensors.torch import load_file

    results = _outcomes(runs, f"huge-lr-{mode}")
    assert [kind for kind, _ in results] == ["NonFiniteError"] * WORLD
    assert results[0][1] == results[1][1]  # the same step and verdict on both ranks
    assert re.match(r"step \d+: (the training loss|parameter \S+) is not finite", results[0][1])
    ckpt = runs / f"huge-lr-{mode}" / CHECKPOINT
    if ckpt.exists():
        assert all(bool(torch.isfinite(t).all()) for t in load_file(str(ckpt)).values() if t.is_floating_point())


def test_changed_settings_on_resume_are_refused_on_every_rank_unless_allowed(runs):
    import json

    for kind, message in _outcomes(runs, "changed"):
        assert kind == "ValueError" and "other settings (base_lr 0.003 -> 0.001)" in message
    assert _outcomes(runs, "allowed") == [None, None]
    metrics = json.loads((runs / "extended" / "metrics.json").read_text())
    assert metrics["step"] == STEPS + 3
    assert metrics["config_changes"] == [{"step": STEPS, "changed": {"total_tokens": [BATCH * STEPS,
                                                                                     BATCH * (STEPS + 3)]}}]


def _two_rank_entry(rank, world, port, out, scenario):
    """Run ``scenario(rank, out)`` on one of two gloo ranks; save the error it raised (or None)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=20))
    try:
        try:
            scenario(rank, out)
            outcome = None
        except Exception as exc:  # noqa: BLE001 - the test compares the ranks' errors
            outcome = (type(exc).__name__, str(exc))
        torch.save(outcome, out / f"outcome.rank{rank}.pt")
        torch.distributed.barrier()  # as sae.cli does: neither rank leaves while the other still works
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(scenario, out) -> list:
    """Spawn two gloo ranks running ``scenario``; their outcomes (fails, never hangs, after 60 s)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_two_rank_entry, args=(WORLD, _free_port(), out, scenario), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 60
    try:
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, "the ranks did not stop"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"outcome.rank{rank}.pt") for rank in range(WORLD)]


def _nan_rows_of_rank_one(rank, out):
    """Data parallel on a buffer whose step-3 batch holds a NaN in rank 1's rows only."""
    data = _buffer()[list(range(400))]
    *_, third = zip(range(3), ActivationBuffer(data).batch_indices(BATCH, seed=0))
    data[third[1][-1]] = float("nan")  # the last row of a sorted batch: rank 1's half
    sae = _make("topk")
    sae.init_b_dec(data[:8])  # not fresh: the NaN row stays out of the b_dec sample
    train(sae, ActivationBuffer(data), _cfg(parallel="data"), out / "run")


def test_non_finite_rows_of_one_rank_stop_every_rank(tmp_path):
    """Data parallel on the CPU: a NaN in one rank's rows stops every rank with the same error (the
    other rank waited in the loss's all-reduce until the first one left, then failed in gloo)."""
    outcomes = _two_ranks(_nan_rows_of_rank_one, tmp_path)
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == ("NonFiniteError", "step 3: the training activations (x) hold NaN or inf. Nothing after "
                                             "step 0 was written.")


def _rows_without_variance_step(rank, out):
    """One data-parallel step on batches where rank 0's rows are all the same row (4 rows a rank,
    then 1), half the latents dead: the summed gradients and the logged losses."""
    from sae.distributed import DataParallel

    saved = {}
    for batch in (8, 2):
        x = _identical_head(batch)
        for arch in ("topk", "expander"):
            sae = _make(arch)
            sae.tokens_since_fired[::2] = 10**6
            dp = DataParallel(sae)
            x_local = dp.local_rows(x)
            loss, logged = dp.objective(x_local, sae(x_local))
            loss.backward()
            dp.sum_gradients()
            saved[batch, arch] = ({n: p.grad.clone() for n, p in sae.named_parameters()},
                                  float(logged["fvu"]), float(logged["auxk_loss"]))
    torch.save(saved, out / f"novar.rank{rank}.pt")


def _identical_head(batch):
    x = _buffer()[list(range(batch))]
    x[:batch // 2] = x[0]  # rank 0's half: one row repeated (its own variance is 0)
    return x


def test_data_parallel_rank_whose_rows_have_no_variance_trains_like_one_process(tmp_path):
    """A rank whose rows are identical (or one row) has no variance of its own: the model's AuxK term,
    normalised by it, was inf and the summed gradients NaN, where one process with the same global
    batch trains. The ranks now sum AuxK's unnormalised error and normalise it globally."""
    assert _two_ranks(_rows_without_variance_step, tmp_path) == [None, None]
    ranks = [torch.load(tmp_path / f"novar.rank{rank}.pt") for rank in range(WORLD)]
    for (batch, arch), (grads, fvu, auxk) in ranks[0].items():
        sae = _make(arch)
        sae.tokens_since_fired[::2] = 10**6
        output = sae(_identical_head(batch))
        output.loss.backward()
        assert output.auxk_loss is not None and math.isfinite(output.auxk_loss.item())
        assert fvu == pytest.approx(output.fvu.item(), rel=1e-5)
        assert auxk == pytest.approx(output.auxk_loss.item(), rel=1e-5)
        for name, p in sae.named_parameters():
            for rank in range(WORLD):
                torch.testing.assert_close(ranks[rank][batch, arch][0][name], p.grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{batch} rows, {arch}, rank {rank}: {name}")


def _rank_zero_callbacks_fail(rank, out):
    """on_step raises on rank 0 alone at step 3; then, in a second run, evaluate (which runs on rank 0
    alone) raises at the end."""
    def on_step(step, log):
        if step == 3 and rank == 0:
            raise OSError("disk full")

    outcomes = []
    for kw in ({"on_step": on_step}, {"evaluate": lambda sae: 1 / 0}):
        try:
            train(_make("topk"), _buffer(), _cfg(parallel="data", total_tokens=BATCH * 5), out / f"run{len(outcomes)}", **kw)
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 - the test compares the ranks' errors
            outcomes.append((type(exc).__name__, str(exc)))
    torch.save(outcomes, out / f"callbacks.rank{rank}.pt")


def test_an_error_on_rank_zero_alone_stops_every_rank(tmp_path):
    """What rank 0 alone does (evaluate, metrics and checkpoint writes) and a callback raising on one
    rank stop every rank at once; the others waited in their next collective until the group's
    timeout."""
    start = time.monotonic()
    assert _two_ranks(_rank_zero_callbacks_fail, tmp_path) == [None, None]
    assert time.monotonic() - start < 15  # the group's timeout is 20 s
    zero, one = (torch.load(tmp_path / f"callbacks.rank{rank}.pt") for rank in range(WORLD))
    assert zero == [("OSError", "disk full"), ("ZeroDivisionError", "division by zero")]
    assert one == [("RuntimeError", "on_step() failed on another rank; see that rank's error"),
                   ("RuntimeError", "evaluate() failed on another rank; see that rank's error")]


def _load_sharded_files(rank, out):
    """load_sharded on both ranks, of files written by the test (each read verified and unverified)."""
    import sae.distributed as sd

    outcomes = []
    for name in ("nan", "repeat"):
        for verify in (True, False):
            try:
                sd.load_sharded(out / f"{name}.safetensors", verify=verify)
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - the test compares the ranks' errors
                outcomes.append((type(exc).__name__, str(exc)))
    torch.save(outcomes, out / f"sharded.rank{rank}.pt")


def test_a_file_one_rank_cannot_load_stops_every_rank(tmp_path):
    """load_sharded of a file with a NaN in rank 1's latents alone: both ranks loaded it (the NaN
    reached the weights; load_sae refuses the file). Now every rank raises CheckpointError at once,
    rank 1 naming the tensor, rank 0 saying another rank's latents hold it. An expander file whose
    graph repeats a row inside one latent of rank 1's slice (refused there alone by the rows check)
    stops both ranks too (rank 0 used to return and wait in its first collective)."""
    from sae import load_sae
    from sae.checkpoint import CheckpointError

    sae = TopKSAE(M, N, K, backend="torch")
    with torch.no_grad():
        sae.W_enc[N - 10, 3] = float("nan")  # latent 86: rank 1 holds [48, 96)
    sae.save(str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="tensor W_enc is not finite"):  # the reference: one process
        load_sae(tmp_path / "nan.safetensors")
    repeat = ExpanderSAE(M, N, K, degree=DEGREE, backend="torch")
    with torch.no_grad():
        repeat.rows[N - 6, 1] = repeat.rows[N - 6, 0]  # latent 90: rank 1's 43rd
    repeat.save(str(tmp_path / "repeat.safetensors"))
    with pytest.raises(CheckpointError, match="latent 90 repeats one"):  # the reference: one process
        load_sae(tmp_path / "repeat.safetensors")
    start = time.monotonic()
    assert _two_ranks(_load_sharded_files, tmp_path) == [None, None]
    assert time.monotonic() - start < 15  # the group's timeout is 20 s
    zero, one = (torch.load(tmp_path / f"sharded.rank{rank}.pt") for rank in range(WORLD))
    path = tmp_path / "nan.safetensors"
    assert zero[:2] == [("CheckpointError", f"checkpoint: {path} holds a tensor that is not finite (in another "
                                            f"rank's latents); expected finite parameters and buffers")] * 2
    assert one[:2] == [("CheckpointError", f"checkpoint: {path} tensor W_enc is not finite (it holds nan); "
                                           f"expected finite parameters and buffers")] * 2
    path = tmp_path / "repeat.safetensors"
    assert zero[2:] == [("RuntimeError", f"load_sharded: reading {path} failed on another rank; see that rank's "
                                         f"error")] * 2
    assert [kind for kind, _ in one[2:]] == ["CheckpointError"] * 2  # naming the file, as load_sae does
    assert all(message.startswith(f"checkpoint: {path} its tensors do not fit a ExpanderSAE") and
               f"in the latents 48..{N - 1} this rank reads (their ids below count from 48: ValueError: rows: expected "
               f"distinct rows within each latent, latent 42 repeats one" in message for _, message in one[2:])


@pytest.mark.parametrize("verify", [True, False])
def test_a_rank_keeps_only_its_rows_of_the_file(tmp_path, verify):
    """Rank 1 of 2 reading a file keeps its 48 latents' rows in memory, not views of the whole
    tensors (a view of a verified tensor would keep all of it alive beside the shard)."""
    from sae.distributed import _read_shard

    sae = _make("topk")
    sae.save(str(tmp_path / "s.safetensors"))
    _, _, _, keys, state = _read_shard(tmp_path / "s.safetensors", 1, 2, None, verify, None)
    assert {"W_enc", "b_enc", "decoder.weight"} <= keys
    for key in keys:
        want = sae.state_dict()[key][N // 2:]
        assert torch.equal(state[key], want), key
        assert state[key].untyped_storage().nbytes() == want.numel() * want.element_size(), key


def _adam_overflow_on_rank_one(rank, out):
    """Latent mode, no clipping: from step 7 rank 1's b_enc gradient is scaled by 1e30, so its
    exp_avg_sq (rank 1's shard alone) overflows to inf while weights and loss stay finite."""
    from sae.distributed import LatentShardedSAE

    sharded, done = LatentShardedSAE.from_model(_make("topk")), [0]
    if rank == 1:
        sharded.shard.b_enc.register_hook(lambda grad: grad * 1e30 if done[0] >= 6 else grad)

    def on_step(step, log):
        done[0] = step

    train(sharded, _buffer(), _cfg(parallel="latent", grad_clip=0.0), out / "run", on_step=on_step)


def test_a_non_finite_adam_state_on_one_rank_stops_every_rank_before_the_checkpoint(tmp_path):
    """The Adam-state check before a checkpoint is shared across latent-mode ranks: rank 1's state
    alone is not finite, and both ranks stop at the checkpoint step (10) with NonFiniteError, the
    step-5 checkpoint kept (a rank stopping alone would leave the other in the checkpoint's gather
    until the group's timeout)."""
    from sae.checkpoint import read_train_record

    start = time.monotonic()
    zero, one = _two_ranks(_adam_overflow_on_rank_one, tmp_path)
    assert time.monotonic() - start < 15  # the group's timeout is 20 s
    assert zero[0] == one[0] == "NonFiniteError"
    assert zero[1].startswith("step 10: the Adam state of a parameter (on another rank) is not finite")
    assert one[1].startswith("step 10: the Adam state exp_avg_sq of shard.b_enc is not finite")
    assert read_train_record(tmp_path / "run" / CHECKPOINT)["step"] == 5


def _allocations_while(fn):
    """``fn()``'s result and the shapes of the tensors it allocated (the outputs of every aten op that
    does not return a view, on a real device: a meta shell or a view of a file's mapping is none)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not any(r.alias_info is not None for r in func._schema.returns):
                shapes.extend(tuple(t.shape) for t in (result if isinstance(result, (tuple, list)) else [result])
                              if isinstance(t, torch.Tensor) and t.device.type != "meta")
            return result

    with Allocations():
        return fn(), shapes


def _created_runs_resumed(rank, out):
    """Per arch, a LatentShardedSAE.create()d run straight through, and the same run killed at step 7
    (last checkpoint at 6) and resumed; each rank records what its resume's load allocated and the
    bytes behind its Adam state after it."""
    import importlib

    from sae.distributed import LatentShardedSAE

    trainer = importlib.import_module("sae.train")  # the module: sae.train is also the function's name
    load, seen = trainer._Ranks.load, {}

    def counted(ranks, path, optimizer, *rest):
        record, shapes = _allocations_while(lambda: load(ranks, path, optimizer, *rest))
        held = [(tuple(v.shape), v.untyped_storage().nbytes() // v.element_size())
                for state in optimizer.state.values() for v in state.values() if v.ndim]
        seen[ranks.model.full_class.__name__] = {"allocated": shapes, "held": held}
        return record

    trainer._Ranks.load = counted

    def kill(step, log):
        if step == 7:
            raise _Killed

    cfg = _cfg(parallel="latent", total_tokens=BATCH * 10, checkpoint_every=3)
    saved = {}
    for arch in ("topk", "expander"):
        config, cls = _make(arch).config(), type(_make(arch))

        def created(seed):
            return LatentShardedSAE.create(cls, config, seed=seed, backend="torch")

        whole = train(created(4), _buffer(), cfg, out / f"{arch}-whole")
        with contextlib.suppress(_Killed):
            train(created(4), _buffer(), cfg, out / f"{arch}-killed", on_step=kill)
        # a fresh model of another seed: what it resumes to comes from the checkpoint alone
        resumed = train(created(5), _buffer(), cfg, out / f"{arch}-killed", resume=True)
        saved[arch] = {"whole": whole.model.shard.state_dict(), "resumed": resumed.model.shard.state_dict(),
                       "whole_history": whole.history, "resumed_history": resumed.history}
    torch.save({"runs": saved, "loads": seen}, out / f"created.rank{rank}.pt")


def test_a_created_sharded_run_resumes_without_building_the_whole_model_on_any_rank(tmp_path):
    """Resuming a latent-sharded run built every rank the whole SAE (empty_full_model) and a whole
    Adam state, read the file into them, and only then kept its rows: a LatentShardedSAE.create()d
    dictionary, sharded because it does not fit in one process, could not resume (2 gloo ranks, TopK
    m=512, n=32768: 384 MiB of heap per rank at the load's peak, the largest piece a whole 64 MiB
    [n, m] matrix). Each rank also kept the whole Adam moments alive behind views of its rows for the
    rest of the run. Now no tensor with n rows is allocated on either rank, each rank's Adam state
    holds its rows alone, and the resumed run ends on the uninterrupted run's weights bit for bit."""
    assert _two_ranks(_created_runs_resumed, tmp_path) == [None, None]
    for rank in range(WORLD):
        saved = torch.load(tmp_path / f"created.rank{rank}.pt")
        for arch, run in saved["runs"].items():
            for name, value in run["whole"].items():
                assert torch.equal(run["resumed"][name], value), (rank, arch, name)
            logged = [[(h["step"], h["fvu"], h["auxk_loss"]) for h in run[which]]
                      for which in ("whole_history", "resumed_history")]
            assert logged[1] == logged[0] and len(logged[0]) == 10, (rank, arch)
        for cls, width in (("TopKSAE", M), ("ExpanderSAE", DEGREE)):
            load = saved["loads"][cls]
            whole = [shape for shape in load["allocated"] if shape and shape[0] == N]
            assert whole == [], f"rank {rank} allocated whole tensors {whole} resuming a {cls}"
            assert load["held"] and all(shape[0] != N and math.prod(shape) == numel
                                        for shape, numel in load["held"]), (rank, cls, load["held"])
            assert (N // WORLD, width) in load["allocated"], (rank, cls)  # the counter sees the rank's moments copied


def _resume_bad_files(rank, out):
    """A created sharded SAE resumed from each of the test's bad checkpoints, on both ranks."""
    from sae.distributed import LatentShardedSAE

    outcomes = []
    for name in ("inf-moment", "corrupt", "repeat"):
        arch = "expander" if name == "repeat" else "topk"
        sharded = LatentShardedSAE.create(type(_make(arch)), _make(arch).config(), seed=4, backend="torch")
        try:
            train(sharded, _buffer(), _cfg(parallel="latent"), out / name, resume=True)
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 - the test compares the ranks' errors
            outcomes.append((type(exc).__name__, str(exc)))
    torch.save(outcomes, out / f"bad.rank{rank}.pt")


def test_a_bad_checkpoint_stops_every_rank_of_a_sharded_resume(tmp_path):
    """Each rank of a sharded resume reads its rows alone, and still refuses what load_checkpoint
    refuses in one process: an infinite Adam moment in rank 1's rows and a tensor that does not match
    its SHA-256 are the same CheckpointError, naming the file, on both ranks (each rank checks every
    tensor through the file's mapping); an expander graph repeating a row in one of rank 1's latents
    is refused there, naming the latents it reads, and rank 0 stops too. None waits for the group's
    timeout."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sae.checkpoint import CheckpointError, read_checkpoint, save_sae

    for arch in ("topk", "expander"):
        train(_make(arch), _buffer(), _cfg(total_tokens=BATCH * 4), tmp_path / f"{arch}-good")
    good = tmp_path / "topk-good" / CHECKPOINT
    ckpt = read_checkpoint(good)
    sae = _make("topk")
    sae.load_state_dict(ckpt.sae_tensors)
    index = [name for name, _ in sae.named_parameters()].index("decoder.weight")
    moments = {k: v.clone() for k, v in ckpt.optimizer_tensors.items()}
    moments[f"{index}.exp_avg_sq"][N - 5, 2] = float("inf")  # latent 91: rank 1 holds [48, 96)
    for name in ("inf-moment", "corrupt", "repeat"):
        (tmp_path / name).mkdir()
    save_sae(sae, tmp_path / "inf-moment" / CHECKPOINT, optimizer_tensors=moments, train=ckpt.train)
    one = _make("topk")
    with pytest.raises(CheckpointError, match=r"exp_avg_sq \(the state of decoder.weight\) is not finite"):
        load_checkpoint(tmp_path / "inf-moment" / CHECKPOINT, one, adam(one.parameters(), 1e-3))  # in one process
    tensors = load_file(str(good))
    tensors["W_enc"][N - 5, 0] += 1  # the stored sums are the good file's
    with safe_open(str(good), framework="pt") as f:
        save_file(tensors, str(tmp_path / "corrupt" / CHECKPOINT), metadata=f.metadata())
    ckpt = read_checkpoint(tmp_path / "expander-good" / CHECKPOINT)
    state = {k: v.clone() for k, v in ckpt.sae_tensors.items()}
    state["rows"][N - 6, 1] = state["rows"][N - 6, 0]  # latent 90: rank 1's 43rd
    repeat = _make("expander")
    for name, value in repeat.state_dict().items():  # copied in place: load_state_dict would refuse the rows
        value.copy_(state[name])
    save_sae(repeat, tmp_path / "repeat" / CHECKPOINT, optimizer_tensors=ckpt.optimizer_tensors, train=ckpt.train)

    start = time.monotonic()
    assert _two_ranks(_resume_bad_files, tmp_path) == [None, None]
    assert time.monotonic() - start < 15  # the group's timeout is 20 s
    zero, one = (torch.load(tmp_path / f"bad.rank{rank}.pt") for rank in range(WORLD))
    path = tmp_path / "inf-moment" / CHECKPOINT
    assert zero[0] == one[0] == (
        "CheckpointError", f"checkpoint: {path} optimizer tensor {index}.exp_avg_sq (the state of decoder.weight) is "
                           f"not finite (it holds inf); expected finite optimizer state")
    path = tmp_path / "corrupt" / CHECKPOINT
    assert zero[1] == one[1] == (
        "CheckpointError", f"checkpoint: {path} is corrupt (tensor W_enc does not match its stored SHA-256)")
    path = tmp_path / "repeat" / CHECKPOINT
    assert zero[2] == ("RuntimeError", "loading the checkpoint failed on another rank; see that rank's error")
    assert one[2][0] == "CheckpointError" and one[2][1].startswith(
        f"checkpoint: {path} its tensors do not fit a ExpanderSAE in the latents 48..{N - 1} this rank reads (their "
        f"ids below count from 48: ValueError: rows: expected distinct rows within each latent, latent 42 repeats one")


def _sigterm_on_rank_one(rank, out):
    """SIGTERM reaches rank 1 alone, after its step 3 (torchrun forwards a signal to each worker
    on its own; they need not see it at the same step)."""
    import signal

    from sae.errors import TrainingInterrupted

    def on_step(step, log):
        if step == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    mode = (out / "mode").read_text()
    try:
        train(_make("topk"), _buffer(), _cfg(parallel=mode, log_every=4, checkpoint_every=100), out / "run",
              on_step=on_step)
        stopped = None
    except TrainingInterrupted as exc:
        stopped = (exc.step, exc.checkpoint_step, int(exc.signum))
    torch.save(stopped, out / f"stopped.rank{rank}.pt")


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_sigterm_on_one_rank_checkpoints_every_rank_at_the_next_log_step(tmp_path, mode):
    """The ranks agree on a stop at the next log step (4), write one checkpoint there and raise
    TrainingInterrupted together; that checkpoint resumes in one process to the uninterrupted
    weights."""
    import signal

    from sae.checkpoint import read_train_record

    (tmp_path / "mode").write_text(mode)
    assert _two_ranks(_sigterm_on_rank_one, tmp_path) == [None, None]
    for rank in range(WORLD):
        assert torch.load(tmp_path / f"stopped.rank{rank}.pt") == (4, 4, int(signal.SIGTERM))
    assert read_train_record(tmp_path / "run" / CHECKPOINT)["step"] == 4
    sae = _make("topk")
    train(sae, _buffer(), _cfg(), tmp_path / "run", resume=True)
    for name, value in _reference("topk")[2].items():
        torch.testing.assert_close(sae.state_dict()[name].float(), value.float(), rtol=1e-4, atol=1e-5, msg=name)


def _narrow_shards_step(rank, out):
    """A latent-sharded step where k exceeds a shard's latents (n = 7 on two ranks, k = 5), AuxK on."""
    import sae.distributed as sd

    torch.manual_seed(0)
    sae = TopKSAE(M, 7, 5, backend="torch", dead_tokens_threshold=64)
    sae.tokens_since_fired.fill_(10**6)
    sharded = sd.LatentShardedSAE.from_model(sae)
    with sd.count_communication() as log:
        sharded(_buffer()[list(range(BATCH))]).loss.backward()
        sharded.clip_grad_norm_(1.0)  # the step's gradient-norm scalar, as the formula counts
    torch.save([(r.op, r.shape, r.bytes) for r in log.records], out / f"narrow.rank{rank}.pt")


def test_communication_formula_counts_narrow_shards(tmp_path):
    """With k above a shard's latent count each rank sends only as many candidates as the widest
    shard holds (here 4 of k = 5), and the formula says so."""
    assert _two_ranks(_narrow_shards_step, tmp_path) == [None, None]
    records = torch.load(tmp_path / "narrow.rank0.pt")
    expected = communication_per_step("latent", batch=BATCH, d_model=M, n_latents=7, k=5, world=WORLD,
                                      auxk_active=True)
    assert expected["parts"]["top-k candidate all-gather"] == WORLD * BATCH * 4 * 8
    assert sum(b for _, _, b in records) == expected["bytes"]

# An Expander whose shards cannot cover the m coordinates on their own (7 latents x degree 4 = 28 < m
# = 32 on each of 2 ranks), though the whole graph does (14 x 4 >= 32): each shard's graph is its
# slice of the whole one, never a graph of its own.
SMALL_M, SMALL_N, SMALL_DEGREE = 32, 14, 4


def _make_small(n=SMALL_N):
    sae = ExpanderSAE(SMALL_M, n, K, degree=SMALL_DEGREE, seed=5, dead_tokens_threshold=10, backend="torch")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    sae.tokens_since_fired[::3] = 100  # 5 dead latents on both ranks: AuxK on
    return sae


def _small_x():
    return torch.randn(BATCH, SMALL_M, generator=torch.Generator().manual_seed(8)) * 2 + 0.5


def _small_expander_shards(rank, out):
    """create, a forward/backward of from_model, save + load_sharded, and a 13-latent single-process
    file read as 7 + 6 latents, with shards too small to cover m."""
    import sae.distributed as sd

    x = _small_x()
    created = sd.LatentShardedSAE.create(ExpanderSAE, _make_small().config(), seed=4)
    saved = {"created_rows": created.shard.rows.clone(), "created": created.full_state_dict()}
    created.save(out / "created.safetensors")
    sharded = sd.LatentShardedSAE.from_model(_make_small())
    output = sharded(x)
    output.loss.backward()
    saved.update(range=(sharded.lo, sharded.hi), x_hat=output.x_hat.detach(), top_acts=output.top_acts.detach(),
                 top_indices=output.top_indices, fvu=output.fvu.detach(), auxk=output.auxk_loss.detach(),
                 grads={name: p.grad.clone() for name, p in sharded.shard.named_parameters()})
    sharded.save(out / "small.safetensors")
    loaded = sd.load_sharded(out / "small.safetensors").eval()
    with torch.no_grad():
        saved["loaded_x_hat"] = loaded(x).x_hat
    if rank == 0:
        _make_small(13).save(str(out / "odd.safetensors"))
    torch.distributed.barrier()
    odd = sd.load_sharded(out / "odd.safetensors").eval()
    with torch.no_grad():
        odd_output = odd(x)
    saved.update(odd_range=(odd.lo, odd.hi), odd_x_hat=odd_output.x_hat, odd_top_acts=odd_output.top_acts,
                 odd_top_indices=odd_output.top_indices)
    torch.save(saved, out / f"small.rank{rank}.pt")


def test_expander_shards_too_small_to_cover_m_work_like_one_process(tmp_path):
    """Each rank built its shard as an ExpanderSAE of its own n/P latents, which asked n/P * degree >= m
    of it (and drew a graph of its own that create then replaced): with more ranks than that allows,
    create, from_model and load_sharded refused ("cannot be built ...; use fewer ranks"). A shard's
    graph is its slice of the whole graph; now the shards take it and every result is the one
    process's."""
    from sae.masks import expander_mask

    assert (SMALL_N // WORLD) * SMALL_DEGREE < SMALL_M <= SMALL_N * SMALL_DEGREE
    assert _two_ranks(_small_expander_shards, tmp_path) == [None, None]
    ranks = [torch.load(tmp_path / f"small.rank{rank}.pt") for rank in range(WORLD)]
    # create: the whole graph, sliced; the file it writes loads in one process
    graph = expander_mask(SMALL_M, SMALL_N, SMALL_DEGREE, seed=5)
    created = ranks[0]["created"]
    assert torch.equal(created["rows"], graph)
    for saved, (lo, hi) in zip(ranks, [(0, 7), (7, 14)]):
        assert torch.equal(saved["created_rows"], graph[lo:hi])
    torch.testing.assert_close(created["values"].norm(dim=1), torch.ones(SMALL_N))
    one = ExpanderSAE.load(str(tmp_path / "created.safetensors"))
    assert all(torch.equal(one.state_dict()[key], value) for key, value in created.items())
    # a forward/backward against the one-process model with the same weights
    sae, x = _make_small(), _small_x()
    output = sae(x)
    output.loss.backward()
    assert output.auxk_loss is not None
    for saved in ranks:
        lo, hi = saved["range"]
        assert hi - lo == SMALL_N // WORLD
        torch.testing.assert_close(saved["x_hat"], output.x_hat.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saved["top_acts"], output.top_acts.detach(), rtol=1e-5, atol=1e-6)
        active = output.top_acts > 0
        assert torch.equal(saved["top_indices"][active], output.top_indices[active])
        torch.testing.assert_close(saved["fvu"], output.fvu.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(saved["auxk"], output.auxk_loss.detach(), rtol=1e-5, atol=1e-7)
        for name, p in sae.named_parameters():
            expected = p.grad if p.grad.shape[0] != SMALL_N else p.grad[lo:hi]
            torch.testing.assert_close(saved["grads"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # the checkpoint the shards wrote is the one-process model's, and reads back sharded
    written = ExpanderSAE.load(str(tmp_path / "small.safetensors"))
    for key, value in sae.state_dict().items():
        assert torch.equal(written.state_dict()[key], value), key
    sae.eval()
    with torch.no_grad():
        expected = sae(x)
    for saved in ranks:
        torch.testing.assert_close(saved["loaded_x_hat"], expected.x_hat, rtol=1e-5, atol=1e-5)
    # resharding: a 13-latent single-process file read as 7 + 6 latents (28 and 24 < m)
    single = ExpanderSAE.load(str(tmp_path / "odd.safetensors")).eval()
    with torch.no_grad():
        expected = single(x)
    assert [saved["odd_range"] for saved in ranks] == [(0, 7), (7, 13)]
    for saved in ranks:
        torch.testing.assert_close(saved["odd_x_hat"], expected.x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(saved["odd_top_acts"], expected.top_acts, rtol=1e-5, atol=1e-6)
        active = expected.top_acts > 0
        assert torch.equal(saved["odd_top_indices"][active], expected.top_indices[active])


def _resume_from_own_folder(rank, out):
    train(_make("topk"), _buffer(), _cfg(parallel="latent"), out / f"rank{rank}", resume=True)


def test_a_checkpoint_only_some_ranks_see_stops_every_rank(tmp_path):
    """Run folders that are not shared (a checkpoint on rank 0's, none on rank 1's): both ranks stop
    with the error naming it (rank 0 loaded it, with collectives, while rank 1 waited in another
    collective: both hung until the group's timeout, then failed in gloo)."""
    def kill(step, log):
        if step == 6:
            raise _Killed

    with pytest.raises(_Killed):
        train(_make("topk"), _buffer(), _cfg(), tmp_path / "rank0", on_step=kill)
    for kind, message in _two_ranks(_resume_from_own_folder, tmp_path):
        assert kind == "RuntimeError" and message.startswith("out_dir: some ranks found a checkpoint in ")


def _assert_rank_grads(step: dict, sae) -> None:
    """A rank's latent-mode gradients (``step["latent_grads"]``) are its rows of one process's."""
    lo, hi = step["latent_range"]
    for name, p in sae.named_parameters():
        expected = p.grad if p.grad.shape[0] != N else p.grad[lo:hi]
        torch.testing.assert_close(step["latent_grads"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_latent_sharded_gradients_equal_one_process(runs):
    sae = _make("topk")
    sae.tokens_since_fired.fill_(10**6)
    output = sae(_buffer()[list(range(BATCH))])
    (output.loss + ACTS_PENALTY * output.top_acts.sum()).backward()
    assert output.auxk_loss is not None
    for rank in range(WORLD):
        step = torch.load(runs / f"step.rank{rank}.pt")
        _assert_rank_grads(step, sae)
        norm = torch.cat([p.grad.reshape(-1) for p in sae.parameters()]).norm()
        assert step["latent_norm"] == pytest.approx(float(norm), rel=1e-5)


def test_data_parallel_gradients_and_dead_counts_equal_one_process(runs):
    sae = _make("expander")
    sae.tokens_since_fired[::2] = 10**6
    output = sae(_buffer()[list(range(BATCH))])
    output.loss.backward()
    assert output.auxk_loss is not None
    for rank in range(WORLD):
        step = torch.load(runs / f"step.rank{rank}.pt")
        for name, p in sae.named_parameters():
            torch.testing.assert_close(step["data_grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(step["data_counts"], sae.tokens_since_fired)


def test_latent_sharded_step_communicates_candidates_not_latents(runs):
    records = torch.load(runs / "step.rank0.pt")["latent"]
    expected = communication_per_step("latent", batch=BATCH, d_model=M, n_latents=N, k=K, world=WORLD,
                                      auxk_active=True)
    assert sum(b for _, _, b in records) == expected["bytes"]
    n_local = N // WORLD
    for op, shape, _ in records:
        numel = torch.Size(shape).numel()
        assert numel <= BATCH * max(M, M // 2, K), (op, shape)  # candidates [B, k_aux] or partials [B, m]
        assert numel < BATCH * n_local, (op, shape)
    ops = [op for op, _, _ in records]
    assert ops.count("all_gather") == 4 and ops.count("all_reduce") == 5  # acts+ids twice; see below
    # all-reduces: [B, m] reconstruction and AuxK residual, dead count, b_dec gradient, gradient norm


def test_data_parallel_step_communicates_gradients_once(runs):
    records = torch.load(runs / "step.rank1.pt")["data"]
    expected = communication_per_step("data", batch=BATCH, d_model=M, n_latents=N, k=K, world=WORLD,
                                      arch="expander", degree=DEGREE)
    assert sum(b for _, _, b in records) == expected["bytes"]


def test_communication_formula_at_scale_never_moves_dense_latents():
    for n in (2**20, 2**24):
        latent = communication_per_step("latent", batch=4096, d_model=2048, n_latents=n, k=64, world=8)
        assert latent["bytes"] == 8 * 4096 * 64 * 8 + 4 * 4096 * 2048 + 4 * 2048 + 12
        assert latent["bytes"] < latent["dense_latents_bytes"] / 100


# ---------------------------------------------------------------------------------------------
# One process (no spawn): the sharded code path in a world of one, and refusals
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_world_of_one_sharded_model_is_the_model(arch):
    from sae.distributed import LatentShardedSAE

    sae = _make(arch)
    sae.tokens_since_fired[::3] = 10**6
    sharded = LatentShardedSAE.from_model(_make(arch))
    sharded.shard.tokens_since_fired[::3] = 10**6
    x = _buffer()[list(range(BATCH))]
    expected, got = sae(x), sharded(x)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.x_hat, expected.x_hat)
    torch.testing.assert_close(got.auxk_loss, expected.auxk_loss)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(dict(sharded.shard.named_parameters())[name].grad, p.grad, msg=name)


@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_world_of_one_fp64_sharded_model_is_the_model_to_fp64_precision(arch):
    """An fp64 latent-sharded SAE decodes, sums and takes its losses in fp64, as the fp64 model does
    (its partials were fp32, so x_hat, FVU, AuxK and the gradients were off by ~1e-7)."""
    from sae.distributed import LatentShardedSAE

    sae = _make(arch).double()
    sae.tokens_since_fired[::3] = 10**6
    sharded = LatentShardedSAE.from_model(_make(arch).double())
    sharded.shard.tokens_since_fired[::3] = 10**6
    x = _buffer()[list(range(BATCH))].double()
    expected, got = sae(x), sharded(x)
    assert got.fvu.dtype == got.auxk_loss.dtype == torch.float64
    expected.loss.backward()
    got.loss.backward()
    tight = dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.x_hat, expected.x_hat, **tight)
    torch.testing.assert_close(got.fvu, expected.fvu, **tight)
    torch.testing.assert_close(got.auxk_loss, expected.auxk_loss, **tight)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(dict(sharded.shard.named_parameters())[name].grad, p.grad, msg=name, **tight)


@pytest.mark.parametrize("arch", ["topk", "expander"])
def test_world_of_one_bf16_sharded_reconstruction_rounds_once_as_the_model(arch):
    """The ranks' partial reconstructions are summed and biased in fp32 and rounded once, as the
    full model's decoder does: in bf16 they were rounded per rank, after the all-reduce and after
    the bias, and ~40 % of x_hat's entries were an ulp off even on one rank. On CPU the model's
    bf16 decoder (an embedding bag over the bf16 rows, ``sparse_decode._bf16_bag_forward``) rounds
    an exact tie away from zero where the sharded fp32 sum's cast rounds it to even: entries may
    differ only there, by one step, the fp32 sum exactly halfway between the two."""
    from sae.distributed import LatentShardedSAE

    sae = _make(arch).to(torch.bfloat16)
    with torch.no_grad():
        sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
    sharded = LatentShardedSAE.from_model(sae)
    x = _buffer()[list(range(BATCH))]
    for inputs in (x.bfloat16(), x):  # bf16 codes, and fp32 x (fp32 codes and x_hat, as the model's)
        want, got = sae(inputs).x_hat, sharded(inputs).x_hat
        assert got.dtype == want.dtype
        if inputs.dtype == torch.bfloat16:
            flat_x = inputs.reshape(-1, inputs.shape[-1])
            acts, ids = sharded.encode(flat_x)
            exact = (sharded._decode_partial(acts, ids) + sae.b_dec.float()).detach()  # fp32, unrounded
            differ = got != want
            tie = (exact.view(torch.int32) & 0xFFFF) == 0x8000  # halfway between two bf16 values
            assert bool((tie | ~differ).all()), int((differ & ~tie).sum())
            steps = (got.float() - want.float()).abs()[differ]
            half_apart = (exact[differ] - want.float()[differ]).abs() * 2
            assert torch.equal(steps, half_apart)  # the tie's two neighbours
        else:
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_sharded_model_keeps_the_sae_dtype_and_its_run_resumes(tmp_path, dtype):
    """Shards, the gathered model, a file read sharded and the latent-mode checkpoint keep the SAE's
    dtype (they were built in the default dtype: a bf16 run wrote fp32 and could not resume)."""
    from sae.checkpoint import read_checkpoint
    from sae.distributed import LatentShardedSAE, load_sharded

    sae = _make("topk").to(dtype)
    sharded = LatentShardedSAE.from_model(sae)
    assert {p.dtype for p in sharded.shard.parameters()} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(sharded.shard.parameters(), sae.parameters()))
    assert {p.dtype for p in sharded.to_model().parameters()} == {dtype}
    sae.save(str(tmp_path / "sae.safetensors"))
    assert {p.dtype for p in load_sharded(tmp_path / "sae.safetensors").shard.parameters()} == {dtype}

    def kill(step, log):
        if step == 7:
            raise _Killed

    cfg = _cfg(parallel="latent", total_tokens=BATCH * 9)
    with pytest.raises(_Killed):
        train(_make("topk").to(dtype), _buffer(), cfg, tmp_path / "run", on_step=kill)
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT).sae_tensors["W_enc"].dtype == dtype
    assert train(_make("topk").to(dtype), _buffer(), cfg, tmp_path / "run", resume=True).step == 9


def test_world_of_one_created_expander_is_the_class_s_own_model_of_the_rank_seed():
    """create no longer draws a graph per shard (it hands each shard its slice of the whole graph):
    the values are still the class's own draw from the rank's seed, the graph the configured seed's."""
    from sae.config import derived_seed
    from sae.distributed import LatentShardedSAE

    config = _make("expander").config()
    created = LatentShardedSAE.create(ExpanderSAE, config, seed=4)
    values = ExpanderSAE(**dict(config, seed=derived_seed(4, 0))).values
    expected = ExpanderSAE(**config)  # the configured seed's graph
    assert torch.equal(created.shard.values, values)
    assert torch.equal(created.shard.rows, expected.rows)
    assert created.shard.seed == config["seed"]


def test_a_config_no_whole_model_can_have_is_refused_by_create_and_load_sharded(tmp_path):
    """Shards no longer ask n/P * degree >= m of themselves; the whole config still must (n * degree
    >= m), refused with the constructor's message, as ExpanderSAE and load_sae refuse it."""
    import json

    from safetensors.torch import save_file

    from sae.checkpoint import CheckpointError
    from sae.distributed import LatentShardedSAE, load_sharded

    config = {**ExpanderSAE(8, 4, 2, degree=2).config(), "d_model": 9}  # 4 * 2 < 9
    message = r"n_latents, degree: expected n_latents \* degree >= d_model=9 so that every coordinate is on some atom"
    with pytest.raises(ValueError, match="^" + message):
        ExpanderSAE(**config)
    with pytest.raises(ValueError, match="^" + message):
        LatentShardedSAE.create(ExpanderSAE, config)
    tensors = {k: v.detach().clone().contiguous() for k, v in ExpanderSAE(8, 4, 2, degree=2).state_dict().items()}
    tensors["b_dec"] = torch.zeros(9)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"config": json.dumps(config), "class": "ExpanderSAE"})
    refused = r"s\.safetensors its config does not describe a ExpanderSAE .*"
    with pytest.raises(CheckpointError, match=refused + message):
        load_sharded(tmp_path / "s.safetensors")


def test_created_sharded_sae_is_initialised_from_the_data_like_a_full_one(tmp_path):
    """train() sets a fresh SAE's b_dec and act_scale from the data first; a LatentShardedSAE.create()d
    one kept b_dec 0 and act_scale 1 (its normalize_activations silently off)."""
    from sae.distributed import LatentShardedSAE
    from sae.train import init_sample

    config = TopKSAE(M, N, K, normalize_activations=True).config()
    created = LatentShardedSAE.create(TopKSAE, config, seed=4)
    train(created, _buffer(), _cfg(parallel="latent", total_tokens=BATCH), tmp_path)
    expected = TopKSAE(**config)
    expected.init_b_dec(init_sample(_buffer()))
    assert float(expected.act_scale) != 1.0
    assert torch.equal(created.shard.act_scale, expected.act_scale)


def test_batch_topk_is_refused():
    from sae.distributed import DataParallel, LatentShardedSAE

    for wrap in (DataParallel, LatentShardedSAE.from_model):
        with pytest.raises(NotImplementedError, match="batch_topk"):
            wrap(TopKSAE(M, N, K, batch_topk=True))


def test_data_parallel_batch_must_split_evenly():
    from sae.distributed import DataParallel

    dp = DataParallel(_make("topk"))
    dp.world = 3  # as on 3 ranks
    with pytest.raises(ValueError, match="batch_size: expected a multiple of the world size 3, got 32"):
        dp.local_slice(32)


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="parallel: expected 'none', 'data' or 'latent', got 'tensor'"):
        train(_make("topk"), _buffer(), _cfg(parallel="tensor"), tmp_path)


@pytest.mark.parametrize("parallel", ["none", "data"])
def test_sharded_model_needs_latent_mode(tmp_path, parallel):
    from sae.distributed import LatentShardedSAE

    with pytest.raises(ValueError, match=f"sae: a LatentShardedSAE trains with parallel='latent', got "
                                         f"parallel='{parallel}'"):
        train(LatentShardedSAE.from_model(_make("topk")), _buffer(), _cfg(parallel=parallel), tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_world_of_one_parallel_modes_train_like_one_process(tmp_path, mode):
    """Without torchrun each mode is a world of one and trains as plain sae.train does."""
    sae = _make("topk")
    result = train(sae, _buffer(), _cfg(parallel=mode), tmp_path / mode)
    if mode == "latent":  # the trained shards gathered, and copied into the SAE passed in (rank 0's)
        for name, value in result.model.to_model().state_dict().items():
            assert torch.equal(sae.state_dict()[name], value), name
    else:
        assert result.model is sae
    _assert_same_training({"history": result.history, "state": sae.state_dict()}, _reference("topk"))


# ---------------------------------------------------------------------------------------------
# python -m sae train under torchrun, on a tiny random-weight Llama (no files from any hub)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama with d_model 32, a word-level tokenizer and a corpus, in a local folder."""
    import random

    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    root = tmp_path_factory.mktemp("tiny-lm")
    words = "the cat sat on a mat and saw many dogs run over hills while birds sang in old trees".split()
    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(12))
    (root / "corpus.txt").write_text(text)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=fast.bos_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def _sae_train(tiny_lm, out, parallel, world):
    """``python -m sae train`` on the tiny model: one process, or ``world`` under torchrun."""
    import subprocess
    import sys

    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(world)]
    command = launcher + ["-m", "sae", "train", "--model", str(tiny_lm / "model"), "--text",
                          str(tiny_lm / "corpus.txt"), "--layer", "1", "--ctx-len", "32", "--eval-contexts", "2",
                          "--arch", "expander", "--degree", "4", "--expansion", "3", "--k", "4", "--tokens", "1536",
                          "--batch-size", "128", "--lr", "3e-3", "--warmup-steps", "3", "--checkpoint-every", "5",
                          "--log-every", "1", "--no-progress", "--parallel", parallel, "--out", str(out)]
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="0", TOPK_SAE_DATA=str(tiny_lm / "data"))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def one_process_cli_run(tiny_lm):
    done = _sae_train(tiny_lm, tiny_lm / "one-process", "none", 1)
    assert done.returncode == 0, done.stderr[-3000:]
    return tiny_lm / "one-process"


@pytest.mark.parametrize("mode", ["data", "latent"])
def test_torchrun_cli_writes_one_checkpoint_that_loads_in_one_process(tiny_lm, one_process_cli_run, tmp_path, mode):
    import json

    from sae.checkpoint import load_sae

    done = _sae_train(tiny_lm, tmp_path / "run", mode, WORLD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"tokens_trained"') == 1  # rank 0 alone prints the row
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        CHECKPOINT, "firing_density.png", "metrics.json", "row.json", "sae.safetensors"]
    trained, checkpoint = load_sae(run / "sae.safetensors"), load_sae(run / CHECKPOINT)
    for name, value in checkpoint.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
    assert load_checkpoint(run / CHECKPOINT, load_sae(run / CHECKPOINT))["step"] == 12
    # the 2-process run trained the SAE one process trains with the same flags
    one = load_sae(one_process_cli_run / "sae.safetensors")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[name].float(), value.float(), rtol=1e-4, atol=1e-5, msg=name)
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["parallel"], metrics["world_size"]) == (mode, WORLD)
    history = metrics["history"]
    one_history = json.loads((one_process_cli_run / "metrics.json").read_text())["history"]
    torch.testing.assert_close(torch.tensor([h["fvu"] for h in history], dtype=torch.float64),
                               torch.tensor([h["fvu"] for h in one_history], dtype=torch.float64), rtol=1e-5, atol=0)
    row = json.loads((run / "row.json").read_text())
    assert row["tokens_trained"] == 1536 and row["batch_size"] == 128 and 0 < row["fvu"] < 2


def test_readme_torchrun_commands_parse_with_torchrun_and_our_cli():
    import shlex

    from torch.distributed.run import get_args_parser

    from sae.cli import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Training on several GPUs or machines", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(c, comments=True) for c in re.findall(r"^\.venv/bin/torchrun .*?(?<!\\)$",
                                                                 section.replace("\\\n", " "), flags=re.M)]
    assert len(commands) == 3
    for words in commands:
        module = words.index("-m")
        launcher = get_args_parser().parse_args(words[1:module] + ["--module", "sae"])
        assert launcher.module and launcher.training_script == "sae"
        assert words[module + 1:module + 3] == ["sae", "train"]
        args = build_parser().parse_args(words[module + 2:])
        assert args.parallel in ("data", "latent") and args.out.startswith("/shared/")


@pytest.mark.parametrize("first, then", [("latent", "data"), ("data", "latent"), ("latent", "none")])
def test_a_run_resumes_in_another_mode(tmp_path, first, then):
    """The checkpoint is the single-process one whatever wrote it (here in worlds of one)."""
    def kill(step, log):
        if step == 13:
            raise _Killed

    with pytest.raises(_Killed):
        train(_make("topk"), _buffer(), _cfg(parallel=first), tmp_path, on_step=kill)
    torch.manual_seed(99)  # the resumed run must not depend on the fresh model's initialisation
    result = train(TopKSAE(M, N, K, dead_tokens_threshold=64, backend="torch"), _buffer(), _cfg(parallel=then),
                   tmp_path, resume=True)
    model = result.model.to_model() if then == "latent" else result.model
    _assert_same_training({"history": result.history, "state": model.state_dict()}, _reference("topk"))


@pytest.mark.skipif(not _OPTIONS, reason="this version of sae.models has no signed / normalised / residual-AuxK SAEs")
@pytest.mark.parametrize("name", list(_OPTIONS) or ["none"])
def test_model_options_give_one_process_results(runs, name):
    x = _buffer()[list(range(BATCH))]
    sae = _make_optioned(name, x)
    output = sae(x)
    (output.loss + ACTS_PENALTY * output.top_acts.abs().sum()).backward()
    plain = _make_optioned(name, x)
    plain_output = plain(x)
    plain_output.loss.backward()
    for rank in range(WORLD):
        step = torch.load(runs / f"options.rank{rank}.pt")[name]
        torch.testing.assert_close(step["latent_x_hat"], output.x_hat.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step["latent_auxk"], output.auxk_loss.detach(), rtol=1e-5, atol=1e-7)
        _assert_rank_grads(step, sae)
        torch.testing.assert_close(step["data_fvu"], plain_output.fvu.detach(), rtol=1e-5, atol=0)
        torch.testing.assert_close(step["data_auxk"], plain_output.auxk_loss.detach(), rtol=1e-5, atol=0)
        for n, p in plain.named_parameters():
            torch.testing.assert_close(step["data_grads"][n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", _AUXK_GRID)
def test_auxk_normalisation_is_the_one_process_one_with_fewer_dead_than_k_aux(runs, name):
    """The AuxK term of both parallel modes equals one process's for both auxk_norm settings, with and
    without normalize_activations (auxk_sq_error in x's units), when fewer latents are dead than
    k_aux (the variance norm's min(dead / k_aux, 1) weight, counted over every rank's latents)."""
    x = _buffer()[list(range(BATCH))]
    sae = _make_auxk(name, x)
    assert len(_AUXK_DEAD) < sae.k_aux
    output = sae(x)
    output.loss.backward()
    assert output.auxk_loss is not None
    if sae.normalize_activations:
        assert abs(float(sae.act_scale) - 1) > 0.1  # else the unscaling of auxk_sq_error would go unseen
    for rank in range(WORLD):
        step = torch.load(runs / f"auxk-grid.rank{rank}.pt")[name]
        torch.testing.assert_close(step["latent_auxk"], output.auxk_loss.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(step["latent_sq"], output.auxk_sq_error.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(step["data_auxk"], output.auxk_loss.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(step["data_loss"], output.loss.detach(), rtol=1e-5, atol=1e-7)
        _assert_rank_grads(step, sae)


def _frozen_b_enc_adam_round_trip(rank, out):
    """A latent-sharded TopK SAE with b_enc frozen (a parameter before the trainable decoder): one
    Adam step, its state gathered to whole-model shapes and handed back to a fresh optimizer."""
    from sae.distributed import LatentShardedSAE

    sharded = LatentShardedSAE.from_model(_make("topk"))
    sharded.shard.b_enc.requires_grad_(False)
    params = [p for p in sharded.parameters() if p.requires_grad]
    opt = adam(params, 1e-3)
    x = _buffer()[list(range(BATCH))]
    sharded(x).loss.backward()
    opt.step()
    full = sharded.full_optimizer_state(opt)
    if rank == 0:
        torch.save(full, out / "full_state.pt")
    torch.distributed.barrier()
    fresh = adam(params, 1e-3)
    sharded.load_full_optimizer_state(fresh, torch.load(out / "full_state.pt"))
    for i, p in enumerate(params):
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value), (i, key)


def test_latent_sharded_adam_state_maps_by_trainable_parameter(tmp_path):
    """Adam's state is indexed by the optimizer's (trainable) parameters: a frozen parameter before
    trainable ones must not shift which parameter each state belongs to (a shifted map treated the
    replicated b_dec's moments as rows of W_dec and gathered them across ranks)."""
    assert _two_ranks(_frozen_b_enc_adam_round_trip, tmp_path) == [None, None]
