"""One source of configuration: every field documented, the CLI's flags and defaults generated
from the dataclasses, and every bad flag refused in one line with exit code 2 before a model loads."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from sae import cli
from sae.config import DataConfig, SAEConfig, TrainConfig, field_docs, from_args


@pytest.mark.parametrize("cls", [SAEConfig, TrainConfig, DataConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    assert [f.name for f in dataclasses.fields(cls)] == list(docs)
    assert all(len(d) > 10 for d in docs.values())


def test_cli_without_flags_gives_the_python_defaults():
    args = cli.build_parser().parse_args(["train"])
    assert from_args(TrainConfig, args) == TrainConfig()
    assert from_args(SAEConfig, args) == SAEConfig()


@pytest.mark.parametrize("command,defaults", [("train", {}), ("evaluate", {"density_tokens": 0}),
                                              ("frontier", {"min_test_tokens": 80_000})])
def test_data_flags_come_from_data_config(command, defaults, tmp_path):
    """Every DataConfig field is a flag of each command, with the field's default (or the
    command's stated one), and the flags parse back into the dataclass."""
    parser = cli.build_parser()
    extra = [str(tmp_path)] if command == "evaluate" else []
    args = parser.parse_args([command, *extra])
    assert from_args(DataConfig, args) == DataConfig(**defaults)
    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for t in texts:
        t.write_text("words")
    args = parser.parse_args([command, *extra, "--text", *map(str, texts), "--layer", "3", "--ctx-len", "17",
                              "--model-dtype", "bfloat16", "--eval-contexts", "none"])
    data = from_args(DataConfig, args)
    assert data == DataConfig(**{**defaults, "text": tuple(map(str, texts)), "layer": 3, "ctx_len": 17,
                                 "model_dtype": "bfloat16"})
    data.validate()


@pytest.mark.parametrize("field,value", [
    ("ctx_len", 1), ("ctx_len", 2.0), ("ctx_len", True), ("layer", -1), ("eval_contexts", 0), ("min_test_tokens", -1),
    ("density_tokens", None), ("validation_fraction", 0.0), ("test_fraction", 1.0), ("test_fraction", "0.1"),
    ("model_dtype", "float16"), ("model", 3), ("text", "corpus.txt"), ("text", ()), ("density_text", ["/no/such"]),
    ("model", "/no/such/model"), ("text", ("",)), ("density_text", ("",)), ("text", (3,)),
])
def test_data_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        DataConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=r"^test_fraction: expected validation_fraction \+ test_fraction < 1"):
        DataConfig(validation_fraction=0.5, test_fraction=0.5).validate()


def test_cli_flags_reach_the_configs():
    args = cli.build_parser().parse_args(["train", "--arch", "expander", "--degree", "7", "--lr", "0.01",
                                          "--tokens", "1000", "--no-auxk", "--betas", "0.8", "0.9", "--seed", "4"])
    sae_cfg, train_cfg = from_args(SAEConfig, args), from_args(TrainConfig, args)
    assert (sae_cfg.arch, sae_cfg.degree, sae_cfg.auxk, sae_cfg.seed) == ("expander", 7, False, 4)
    assert (train_cfg.lr, train_cfg.total_tokens, train_cfg.betas, train_cfg.seed) == (0.01, 1000, (0.8, 0.9), 4)


def test_per_architecture_learning_rates_and_relative_dead_threshold():
    from sae import ExpanderSAE, TopKSAE

    cfg = TrainConfig(total_tokens=1_000_000, batch_size=1000)
    assert cfg.lr_for(TopKSAE(8, 16, 2)) == cfg.topk_lr
    assert cfg.lr_for(ExpanderSAE(8, 16, 2, degree=3)) == cfg.expander_lr
    assert TrainConfig(lr=1e-3).lr_for(ExpanderSAE(8, 16, 2, degree=3)) == 1e-3
    assert cfg.dead_tokens() == int(cfg.dead_fraction * 1_000_000)


@pytest.mark.parametrize("command", ["train", "frontier", "evaluate"])
def test_help_shows_every_default_and_a_help_for_every_flag(command):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest in ("help", "checkpoint"):
            continue
        if action.help == argparse.SUPPRESS:  # kept only to refuse it by name (frontier --seed)
            continue
        assert action.help, action.option_strings
        assert "(default:" in action.help, action.option_strings


@pytest.mark.parametrize("argv,flag", [
    (["--arch", "expander"], "--degree"),
    (["--batch-size", "0"], "--batch-size"),
    (["--eval-contexts", "0"], "--eval-contexts"),
    (["--eval-contexts", "-1"], "--eval-contexts"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--text", "/no/such/file.txt"], "--text"),
    (["--checkpoint-every", "0"], "--checkpoint-every"),
    (["--tokens", "0"], "--tokens"),
    (["--k", "0"], "--k"),
    (["--degree", "0", "--arch", "expander"], "--degree"),
    (["--degree", "7"], "--degree"),  # arch topk (the default) has no degree: refused, not dropped
    (["--auxk-coef", "nan"], "--auxk-coef"),
    (["--model", "/no/such/model"], "--model"),
    (["--model", "./no/such/model"], "--model"),
])
def test_bad_flags_stop_before_any_model_loads(argv, flag, monkeypatch, capsys, tmp_path):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_Workspace", no_model)
    assert cli.main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err


def test_folder_or_empty_file_where_a_file_is_expected(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_Workspace", lambda *a: pytest.fail("a model was loaded"))
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["train", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r")]) == 2
    assert "--text" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "folder" in err and len(err.strip().splitlines()) == 1


def test_a_bad_type_is_one_line_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "sae", "train", "--k", "abc"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--k" in proc.stderr


def test_configs_refuse_a_negative_seed_and_an_untied_topk():
    from sae.models import TopKSAE

    for make in (lambda: SAEConfig(seed=-1), lambda: TrainConfig(seed=-1), lambda: SAEConfig(seed=True)):
        with pytest.raises(ValueError, match=r"^seed: expected an int >= 0"):
            make().validate()
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0"):
        TopKSAE(8, 16, 2, seed=-1)
    with pytest.raises(ValueError, match=r"^tied: only for arch 'expander'"):
        SAEConfig(arch="topk", tied=False).validate()
    SAEConfig(arch="expander", degree=3, tied=False).validate()
    with pytest.raises(ValueError, match=r"^batch_size: expected >= 2"):
        TrainConfig(batch_size=1).validate()


def test_sae_config_refuses_k_one_past_n_latents():
    """k = n_latents is the largest k: one more is refused by the config, before any model is built."""
    SAEConfig(n_latents=17, k=17).validate()
    with pytest.raises(ValueError, match=r"^k: expected k <= n_latents=17, got 18"):
        SAEConfig(n_latents=17, k=18).validate()


def test_options_of_another_architecture_are_refused_not_dropped():
    """A TopK SAE has no degree and is never untied: SAEConfig.validate, SAEConfig.build and the
    TopKSAE constructor refuse them naming the field, instead of building an SAE without them."""
    from sae.models import TopKSAE

    with pytest.raises(ValueError, match=r"^degree: only for arch 'expander'"):
        SAEConfig(arch="topk", degree=7).validate()
    with pytest.raises(ValueError, match=r"^degree: only for arch 'expander'"):
        TopKSAE(8, 16, 2, degree=3)
    with pytest.raises(ValueError, match=r"^tied: only for arch 'expander'"):
        SAEConfig(arch="topk", tied=False).build(16)
    assert SAEConfig(arch="expander", degree=3, tied=False).build(16).tied is False


def test_seeds_past_a_torch_generator_s_range_are_refused_naming_the_seed():
    """A torch.Generator takes seeds below 2**64: a larger one is refused by the configs and the
    models naming ``seed``, not by torch's "Overflow when unpacking long long" when a draw starts."""
    from sae.models import TopKSAE

    for make in (lambda: SAEConfig(seed=2**64), lambda: TrainConfig(seed=2**64)):
        with pytest.raises(ValueError, match=r"^seed: expected an int >= 0"):
            make().validate()
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0"):
        TopKSAE(8, 16, 2, seed=2**64)
    SAEConfig(seed=2**64 - 1).validate()
    TrainConfig(seed=2**64 - 1).validate()
    assert TopKSAE(8, 16, 2, seed=2**64 - 1).seed == 2**64 - 1


@pytest.mark.parametrize("field,value", [
    ("lr", True), ("lr", "0.01"), ("topk_lr", True), ("expander_lr", None), ("eps", "1e-8"), ("grad_clip", None),
    ("decay_fraction", "0.2"), ("dead_fraction", None), ("betas", 0.9), ("betas", ("a", "b")),
    ("progress", "no"), ("warmup_steps", True), ("resample_every", False),
])
def test_train_config_refuses_a_wrong_type_naming_the_field(field, value):
    """train() validates its TrainConfig: a wrong type is a ValueError naming the field, as SAEConfig
    gives, not a bare TypeError from a comparison (lr="0.01"), nor accepted (lr=True trained at 1.0,
    progress="no" showed the bar)."""
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        TrainConfig(**{field: value}).validate()


def test_an_empty_text_path_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch):
    """``--text ""`` (a shell variable left unset) named no file, but pathlib reads "" as ".", so
    the run trained on whatever *.txt the working folder held, silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unrelated.txt").write_text("words")
    for flag in ("--text", "--density-text"):
        args = cli.build_parser().parse_args(["train", flag, ""])
        with pytest.raises(cli._UsageError, match=rf"^{flag}: expected a text file or folder path, got ''"):
            cli._data_config(args)
