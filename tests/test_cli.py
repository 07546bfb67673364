"""``python -m sae``: the commands exist, training is reproducible, resumable and interruptible on a tiny
random-weight transformers model with a tokenizer trained on the spot (no files from any hub); the
frontier end to end is in test_frontier.py."""

import json
import re
import subprocess
import sys

import pytest
from helpers import word_level_corpus
from sae.checkpoint import read_train_record

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def test_help_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "sae", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "frontier"):
        assert command in proc.stdout


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with d_model 32 and a word-level tokenizer, saved as a local folder."""
    root = tmp_path_factory.mktemp("tiny")
    fast = word_level_corpus(root, seed=0, paragraphs=12, words_per_paragraph=400)
    config = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=fast.bos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def _env(tmp_path):
    import os

    env = dict(os.environ, TOPK_SAE_DATA=str(tmp_path / "data"))
    env.pop("TRITON_INTERPRET", None)
    return env


def _train_cmd(tiny_model, out, *extra):
    return [sys.executable, "-m", "sae", "train", "--model", str(tiny_model / "model"), "--text",
            str(tiny_model / "corpus.txt"), "--layer", "1", "--ctx-len", "32", "--eval-contexts", "2", "--min-test-tokens", "0", "--expansion",
            "2", "--k", "4", "--tokens", "2048", "--batch-size", "128", "--checkpoint-every", "4", "--no-progress",
            "--out", str(out), *extra]


def test_two_identical_runs_give_bit_identical_saes_and_resume_checks_settings(tiny_model, tmp_path):
    env = _env(tmp_path)
    for name in ("a", "b"):
        proc = subprocess.run(_train_cmd(tiny_model, tmp_path / name, "--seed", "3"), capture_output=True,
                              text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "a" / "sae.safetensors").read_bytes() == (tmp_path / "b" / "sae.safetensors").read_bytes()
    row = json.loads((tmp_path / "a" / "row.json").read_text())
    assert row["tokens_trained"] == 2048 and row["seed"] == 3
    # resuming the finished run with another batch size is refused before the model loads
    proc = subprocess.run(_train_cmd(tiny_model, tmp_path / "a", "--seed", "3", "--batch-size", "64"),
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "--batch-size 128 -> 64" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_second_trainer_on_one_out_exits_at_once(tiny_model, tmp_path):
    import textwrap
    import time

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from sae.rundir import RunLock
        lock = RunLock({str(tmp_path / "run")!r}).__enter__()
        print("held", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        proc = subprocess.run(_train_cmd(tiny_model, tmp_path / "run"), capture_output=True, text=True, timeout=60,
                              env=_env(tmp_path))
        assert proc.returncode == 1 and f"in use by process {holder.pid}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and time.perf_counter() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_prints_one_line_with_the_resume_command(tiny_model, tmp_path, name, code):
    """Ctrl-C or SIGTERM (a scheduler's preemption): the step in hand is checkpointed, one line
    says where and how to resume, and the exit status is the shell's 128 + signal."""
    import signal
    import time

    cmd = _train_cmd(tiny_model, tmp_path / "run")
    cmd[cmd.index("--tokens") + 1] = "100000000"
    # A job a non-interactive shell starts in the background (``.ci/run &``) inherits SIGINT as
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the terminal's
    # default, as a user pressing Ctrl-C has.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until training runs
        if "training activations ready" in line:
            break
    time.sleep(3)
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"({name}); the last checkpoint" in last and "resume with: python -m sae train" in last, last
    step = int(re.search(r"interrupted at step (\d+) of", last).group(1))
    assert f"(step {step}) is in" in last
    assert read_train_record(tmp_path / "run" / "checkpoint.safetensors")["step"] == step


def test_firing_density_counts_the_density_text_after_the_splits(tiny_model, tmp_path):
    """--density-text adds held-out activations after the training and test splits, up to
    --density-tokens (the embedded corpus alone is short of the 1M the frontier asks for)."""
    import transformers

    from sae.data import load_texts, token_splits

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model / "model")
    splits = token_splits(load_texts([tiny_model / "corpus.txt"]), tok, 32)
    base = splits.train.shape[0] * 31 + 2 * 31  # position 0 of each context is left out; --eval-contexts 2
    extra = tmp_path / "extra.txt"
    extra.write_text(" ".join(reversed((tiny_model / "corpus.txt").read_text().split())))
    proc = subprocess.run(_train_cmd(tiny_model, tmp_path / "run", "--density-tokens", str(base + 40),
                                     "--density-text", str(extra)), capture_output=True, text=True, timeout=600,
                          env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "run" / "row.json").read_text())
    assert row["firing_density_tokens"] == base + 40
    assert row["firing_density_sources"] == "train split + test split + --density-text"
    proc = subprocess.run(_train_cmd(tiny_model, tmp_path / "bad", "--density-text", str(tmp_path / "none.txt")),
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path))
    assert proc.returncode == 2 and "--density-text:" in proc.stderr and "does not exist" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Flags that are refused in one line (exit 2), before any model loads where the flag alone tells
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """A finished k = 4 run (--no-progress), its data cache, and the process that trained it."""
    root = tmp_path_factory.mktemp("finished")
    proc = subprocess.run(_train_cmd(tiny_model, root / "run", "--seed", "3"), capture_output=True, text=True,
                          timeout=600, env=_env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", _env(root), proc


def _copy_run(finished_run, tmp_path):
    import shutil

    run, env, _ = finished_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", env


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("python -m sae")]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_no_progress_silences_every_bar(finished_run):
    """--no-progress: no harvest, CE-baseline or model-loading bar either (the run harvested and
    computed its baselines afresh)."""
    _, _, proc = finished_run
    for bar in ("harvest layer", "CE baseline", "Loading weights", "it/s]", "batch/s]"):
        assert bar not in proc.stderr, (bar, proc.stderr[-2000:])


def test_resume_with_another_sae_flag_is_refused_before_the_model_loads(tiny_model, finished_run, tmp_path):
    """The SAE's own flags never change on resume: refused up front (train() would fail to load the
    checkpoint into another SAE after the harvest), with any changed training flag named too."""
    run, env = _copy_run(finished_run, tmp_path)

    def with_k(k, *flags):
        cmd = _train_cmd(tiny_model, run, "--seed", "3", *flags)
        cmd[cmd.index("--k") + 1] = k
        return cmd

    for cmd, needles in ((with_k("8"), ("--k 4 -> 8",)),
                         (with_k("4", "--arch", "expander", "--degree", "2"), ("--arch topk -> expander",)),
                         (with_k("8", "--batch-size", "64", "--allow-config-change"),
                          ("--k 4 -> 8", "--batch-size 128 -> 64"))):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        line = _one_line_error(proc, "resume:", str(run), "cannot change on resume", *needles)
        assert "[sae]" not in proc.stdout, (line, proc.stdout)  # refused before the model loaded


def test_resume_with_another_seed_and_allow_config_change_keeps_the_checkpoints_sae(tiny_model, finished_run,
                                                                                    tmp_path):
    """--seed is a training setting too: with --allow-config-change the run resumes (the SAE's
    weights, and its seed, from the checkpoint; the change recorded) instead of failing to load
    the checkpoint into an SAE of another seed. --density-tokens 0 skips the firing density."""
    run, env = _copy_run(finished_run, tmp_path)
    proc = subprocess.run(_train_cmd(tiny_model, run, "--seed", "5"), capture_output=True, text=True, timeout=120,
                          env=env)
    _one_line_error(proc, "--seed 3 -> 5", "--allow-config-change")
    proc = subprocess.run(_train_cmd(tiny_model, run, "--seed", "5", "--allow-config-change", "--density-tokens", "0"),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changes = json.loads((run / "metrics.json").read_text())["config_changes"]
    assert changes and changes[-1]["changed"] == {"seed": [3, 5]}
    row = json.loads((run / "row.json").read_text())
    assert row["seed"] == 3 and "firing_density_tokens" not in row


def test_corrupt_checkpoint_is_one_line(tiny_model, finished_run, tmp_path):
    """A checkpoint whose header reads but whose tensors do not match their checksums: train()'s
    CheckpointError becomes one line with exit 2, not a traceback."""
    run, env = _copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes
    ckpt.write_bytes(bytes(data))
    proc = subprocess.run(_train_cmd(tiny_model, run, "--seed", "3"), capture_output=True, text=True, timeout=300,
                          env=env)
    _one_line_error(proc, "checkpoint:", "corrupt")


def test_batch_larger_than_the_training_split_is_refused_before_the_harvest(tiny_model, finished_run, tmp_path):
    _, env, _ = finished_run
    proc = subprocess.run(_train_cmd(tiny_model, tmp_path / "run", "--batch-size", "1000000"),
                          capture_output=True, text=True, timeout=300, env=env)
    _one_line_error(proc, "--batch-size:", "1,000,000")
    assert "training activations ready" not in proc.stdout
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_empty_test_split_is_refused_before_training(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(" ".join((tiny_model / "corpus.txt").read_text().split()[:40]))  # one context of 32
    cmd = _train_cmd(tiny_model, tmp_path / "run", "--batch-size", "16", "--tokens", "64")
    cmd[cmd.index("--text") + 1] = str(short)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    _one_line_error(proc, "--test-fraction:", "test split is empty", "--ctx-len")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_min_test_tokens_is_a_floor_on_the_tokens_evaluated(tiny_model, tmp_path):
    """--eval-contexts cannot take the evaluation below --min-test-tokens (the floor was checked on the
    whole test split only, so the frontier's 80,000 could be evaluated on 256 tokens)."""
    cmd = _train_cmd(tiny_model, tmp_path / "run", "--batch-size", "16", "--tokens", "64")
    cmd[cmd.index("--min-test-tokens") + 1] = "65"  # --eval-contexts 2 of --ctx-len 32: 64 tokens
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    _one_line_error(proc, "--eval-contexts:", "64 tokens", "--min-test-tokens 65")
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_evaluate_counts_firing_density_with_density_tokens(tiny_model, finished_run):
    """evaluate's --density-tokens (default 0: none) counts the firing density as train does: the
    training split first."""
    run, env, _ = finished_run
    cmd = _train_cmd(tiny_model, run)
    data_flags = cmd[cmd.index("--model"):cmd.index("--expansion")]
    proc = subprocess.run([sys.executable, "-m", "sae", "evaluate", str(run / "sae.safetensors"), *data_flags,
                           "--density-tokens", "100"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert row["firing_density_tokens"] == 100 and row["firing_density_sources"].startswith("train split")
    assert 0 <= row["never_fired"] <= 64
    assert "trained_on" not in row and "warning" not in proc.stderr


def test_evaluate_says_when_the_run_trained_on_another_layer(tiny_model, finished_run):
    run, env, _ = finished_run
    cmd = _train_cmd(tiny_model, run)
    data_flags = cmd[cmd.index("--model"):cmd.index("--expansion")]
    data_flags[data_flags.index("--layer") + 1] = "0"
    proc = subprocess.run([sys.executable, "-m", "sae", "evaluate", str(run / "sae.safetensors"), *data_flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" in proc.stderr and "--layer 1 -> 0" in proc.stderr
    row = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert row["layer"] == 0 and row["trained_on"] == {"layer": 1}


def _main(argv, capsys, monkeypatch):
    """``sae.cli.main`` in this process; a model load fails the test (every check here comes first)."""
    from sae import cli

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded: the flag passed the up-front checks")

    monkeypatch.setattr(cli, "_Workspace", no_model)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, (rc, err)
    return err


@pytest.mark.parametrize("argv, needles", [
    (["train", "--arch", "topk", "--no-tied"], ["tied:", "expander", "tied=False"]),
    (["train", "--seed", "-1"], ["--seed:", ">= 0"]),
    (["frontier", "--seed", "7"], ["--seed:", "--seeds 7"]),
    (["frontier", "--control-lr", "nan"], ["--control-lr:"]),
    (["frontier", "--control-lr", "-1"], ["--control-lr:"]),
    (["frontier", "--control-resample", "-5"], ["--control-resample:"]),
    (["frontier", "--sweep-factors", "1", "inf"], ["--sweep-factors:", "inf"]),
    (["frontier", "--seeds", "0", "0"], ["--seeds:", "distinct"]),
    (["frontier", "--ks", "4", "8", "4"], ["--ks:", "distinct"]),
    (["frontier", "--degrees", "2", "2"], ["--degrees:", "distinct"]),
    (["frontier", "--batch-topk"], ["--control:", "--signed", "--no-control"]),
    (["frontier", "--n-latents", "16", "--ks", "8", "32"], ["--ks:", "n_latents=16", "32"]),
    (["frontier", "--parallel", "data"], ["--parallel:", "--only"]),  # one process: the grid splits with --only
])
def test_bad_flags_are_refused_before_any_model_loads(argv, needles, capsys, monkeypatch, tmp_path):
    runs = ["--runs", str(tmp_path / "runs")] if argv[0] == "frontier" else ["--out", str(tmp_path / "run")]
    err = _main(argv + runs, capsys, monkeypatch)
    for needle in needles:
        assert needle in err, (needle, err)


def test_frontier_refuses_a_run_folder_trained_with_other_flags(tiny_model, tmp_path):
    """A second sitting with other flags neither reuses the first sitting's finished SAE nor
    trains anything: one line naming the folder and the flags that differ."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "sae", "frontier", "--model", str(tiny_model / "model"), "--text",
           str(tiny_model / "corpus.txt"), "--layer", "1", "--ctx-len", "32", "--eval-contexts", "2",
           "--min-test-tokens", "0", "--expansion", "2", "--ks", "4", "--degrees", "2", "--seeds", "0",
           "--dense-between", "0", "--skip-sweep", "--no-control", "--tokens", "512", "--checkpoint-every", "2",
           "--no-progress", "--density-tokens", "500", "--only", "expander", "--runs", str(runs)]
    proc = subprocess.run(cmd + ["--batch-size", "128"], capture_output=True, text=True, timeout=300,
                          env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (runs / "frontier.json").read_bytes()
    proc = subprocess.run(cmd + ["--batch-size", "64", "--auxk-coef", "0.5"], capture_output=True, text=True,
                          timeout=300, env=_env(tmp_path))
    _one_line_error(proc, "--runs:", str(runs / "expander_k4_n64_d2_s0"), "--batch-size 128 -> 64",
                    "--auxk-coef 0.03125 -> 0.5")
    assert "training on" not in proc.stdout and (runs / "frontier.json").read_bytes() == before
    # another layer of the same width: the finished row saw other data
    proc = subprocess.run(cmd + ["--batch-size", "128", "--layer", "0"], capture_output=True, text=True,
                          timeout=300, env=_env(tmp_path))
    _one_line_error(proc, "--layer 1 -> 0")


def test_resume_without_the_run_s_own_dead_threshold_is_refused_before_the_model_loads(tmp_path):
    """A run trained with --dead-tokens-threshold resumed without it would derive another threshold
    and go on unlike the uninterrupted run: refused, naming the flag; a derived one resumes."""
    import torch

    from sae.cli import _check_resume, _UsageError
    from sae.config import SAEConfig, TrainConfig
    from sae.data import ActivationBuffer
    from sae.train import train

    buffer = ActivationBuffer(torch.randn(300, 8))
    train_cfg = TrainConfig(batch_size=32, total_tokens=32 * 4, progress=False)
    for name, threshold in (("set", 40), ("derived", None)):
        sae_cfg = SAEConfig(arch="topk", n_latents=24, k=3, dead_tokens_threshold=threshold)
        train(sae_cfg.build(8), buffer, train_cfg, tmp_path / name)
    unset = SAEConfig(arch="topk", n_latents=24, k=3)
    with pytest.raises(_UsageError, match=r"--dead-tokens-threshold 40 -> None"):
        _check_resume(tmp_path / "set", unset, train_cfg, allow=True)
    assert _check_resume(tmp_path / "set", SAEConfig(arch="topk", n_latents=24, k=3, dead_tokens_threshold=40),
                         train_cfg, allow=False).dead_tokens_threshold == 40
    assert _check_resume(tmp_path / "derived", unset, train_cfg, allow=False) == unset


def test_ctrl_c_after_training_does_not_say_training_never_started(tmp_path, monkeypatch, capsys):
    """Ctrl-C outside train()'s loop (here: in the evaluation after it, the harvest of a frontier's
    next SAE) must not report "before training started" when the run folder holds a finished run."""
    import torch

    import sae.cli as cli
    from sae.checkpoint import read_checkpoint
    from sae.config import TrainConfig
    from sae.data import ActivationBuffer
    from sae.models import TopKSAE
    from sae.train import CHECKPOINT, train

    out = tmp_path / "run"

    def trained_then_interrupted(args):
        train(TopKSAE(8, 24, 3), ActivationBuffer(torch.randn(300, 8)),
              TrainConfig(batch_size=32, total_tokens=32 * 4, progress=False), out)
        raise KeyboardInterrupt  # as in the evaluation that follows

    monkeypatch.setattr(cli, "cmd_train", trained_then_interrupted)
    assert cli.main(["train", "--out", str(out)]) == 130
    assert read_checkpoint(out / CHECKPOINT).train["step"] == 4  # the run finished
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "before training started" not in last and f"python -m sae train --out {out}" in last, last


def test_a_value_error_from_train_is_named_not_a_name_error(tmp_path, monkeypatch):
    """``_train_group`` turns train()'s refusal of a TrainConfig field into a one-line flag error
    and lets any other ValueError through as it came; neither may become a NameError of the CLI."""
    import sys as _sys
    import types

    import torch

    import sae.cli as cli
    from sae.config import SAEConfig, TrainConfig
    from sae.data import ActivationBuffer

    buffer = ActivationBuffer(torch.randn(300, 8))
    ws = types.SimpleNamespace(n_train_activations=len(buffer), buffer=lambda: buffer, d_model=8,
                               args=types.SimpleNamespace(ctx_len=4),
                               splits=types.SimpleNamespace(train=torch.zeros(75, 4)))
    job = (SAEConfig(arch="topk", n_latents=24, k=3), TrainConfig(batch_size=32, total_tokens=64, progress=False),
           tmp_path / "run", None)
    for message, expected in (("batch_size: expected fewer", cli._UsageError),
                              ("n_latents: expected more", ValueError)):
        def refuses(*args, message=message, **kwargs):
            raise ValueError(message)

        monkeypatch.setattr(_sys.modules["sae.train"], "train", refuses)
        with pytest.raises(expected) as info:
            cli._train_group(ws, [job], types.SimpleNamespace())
        assert type(info.value) is expected
        assert str(info.value) == ("--batch-size: expected fewer" if expected is cli._UsageError else message)


def test_frontier_parallel_none_names_the_mode_it_runs_in(capsys, monkeypatch, tmp_path):
    """``frontier --parallel none`` passes the up-front checks (it is the one-process mode the
    frontier runs in); ``data`` and ``latent`` are refused above."""
    from sae import cli

    loaded = []

    def no_model(*args, **kwargs):
        loaded.append(1)
        raise cli._UsageError("stop here")

    monkeypatch.setattr(cli, "_Workspace", no_model)
    rc = cli.main(["frontier", "--parallel", "none", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and loaded and "--parallel" not in err, (rc, err)
