"""``python -m sae frontier`` end to end on the tiny random Llama (conftest's ``tiny_llama``, saved
with a word-level tokenizer trained on the spot): lr sweeps, storage-matched dense sizes, seeds,
the paper-recipe control, every row field, the plot, resuming; and an independent recomputation
of CE_zero (every position zeroed) and CE_sae (non-BOS splice) from a saved SAE file."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import word_level_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sae.cli import dense_sizes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "results"))
from recompute_ce import recompute_ce  # noqa: E402  (the script run on the committed SAE files)
from tables import render  # noqa: E402  (prints results/README.md's tables from frontier.json)

VOCAB = 101  # tiny_llama's vocabulary

ROW_FIELDS = {
    "seed", "ce_convention", "model", "model_file", "model_sha256", "model_dtype", "bos_id", "test_tokens", "lr",
    "training_dead_fraction", "training_dead_window_tokens", "other_params", "decoder_values", "tokens_trained",
    "ce_clean", "ce_zero", "ce_sae", "ce_recovered", "ce_recovered_low", "ce_recovered_high", "delta_ce",
    "delta_ce_low", "delta_ce_high", "kl", "kl_low", "kl_high", "ce_mean_ablation", "pos0_kept_ce_zero",
    "pos0_kept_recovered", "fvu", "rel_err", "l0", "firing_density_plot", "firing_density_tokens", "layer",
    "n_latents", "k", "degree", "arch", "lr_bracketed", "lr_selected_on", "matched_degree", "control",
}


@pytest.fixture(scope="module")
def tiny_folder(tiny_llama, tmp_path_factory):
    """tiny_llama saved as a model folder with a 20-word tokenizer whose BOS id is the model's."""
    root = tmp_path_factory.mktemp("tiny_frontier")
    fast = word_level_corpus(root, seed=1, paragraphs=10, words_per_paragraph=500)
    assert fast.bos_token_id == tiny_llama.config.bos_token_id and fast.vocab_size <= tiny_llama.config.vocab_size
    tiny_llama.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def test_dense_sizes_match_storage_and_cap_at_k():
    sizes = dense_sizes(4608, 576, 64, [7, 30, 100])
    by_n = {s["n"]: s for s in sizes}
    assert by_n[240]["matched_degree"] == 30 and by_n[800]["matched_degree"] == 100 and 4608 in by_n
    # d=7 gives n' = 56 < k = 64: raised to k, storing 64/56 of the Expander's values
    assert by_n[64]["matched_degree"] == 7 and by_n[64]["storage_ratio"] == pytest.approx(64 / 56)
    assert [s["n"] for s in dense_sizes(4608, 576, 32, [7, 30, 100])][:1] == [56]
    between = [s["n"] for s in sizes if s["matched_degree"] is None and s["n"] != 4608]
    assert between == [round(math.sqrt(800 * 4608))]


def test_only_plans_a_part_of_the_grid():
    """--only splits the grid between processes: each part plans exactly its own points, named as
    the whole grid names them, and the parts together are the whole."""
    from argparse import Namespace

    from sae.cli import _frontier_plan, _point_name

    def plan(only):
        args = Namespace(n_latents=None, expansion=8, ks=[32, 64], degrees=[7, 30, 100], seeds=[0, 1, 2],
                         dense_between=1, only=only)
        points, sweeps = _frontier_plan(args, 576)
        return [_point_name(p["arch"], p["k"], p["n"], p["degree"], p["seed"]) for p in points], set(sweeps)

    whole, whole_sweeps = plan(None)
    dense, dense_sweeps = plan(["dense"])
    expander, expander_sweeps = plan(["expander"])
    assert len(whole) == 48 and sorted(dense + expander) == sorted(whole)
    assert all(name.startswith("topk_") for name in dense) and all(n.startswith("expander_") for n in expander)
    assert dense_sweeps | expander_sweeps == whole_sweeps and not dense_sweeps & expander_sweeps
    assert plan(["control"]) == ([], set())  # the control is one row outside the plan


def test_frontier_end_to_end(tiny_folder, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, "-m", "sae", "frontier", "--model", str(tiny_folder / "model"),
           "--text", str(tiny_folder / "corpus.txt"), "--layer", "2", "--ctx-len", "24", "--min-test-tokens", "200",
           "--expansion", "3", "--ks", "5", "--degrees", "4", "--seeds", "0", "1", "--sweep-factors", "0.5", "2",
           "--sweep-tokens", "768", "--sweep-extend", "1", "--tokens", "1536", "--batch-size", "128",
           "--control-resample", "4", "--checkpoint-every", "8", "--density-tokens", "3000", "--no-progress",
           "--runs", str(runs), "--out", str(out)]
    env = dict(os.environ, TOPK_SAE_DATA=str(tmp_path / "data"))
    env.pop("TRITON_INTERPRET", None)
    # One part first (as a second process would train it), unpublished; the whole run reuses it.
    part = [a for a in cmd[:cmd.index("--out")]] + ["--only", "expander"]
    proc = subprocess.run(part, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    partial = json.loads((runs / "frontier.json").read_text())
    assert not partial["complete"] and {r["arch"] for r in partial["rows"]} == {"expander"} and not out.exists()
    assert {r["control"] for r in partial["rows"]} == {None} and len(partial["rows"]) == 2
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done earlier") == 2 and "lr sweep expander" not in proc.stdout
    published = json.loads((out / "frontier.json").read_text())
    assert published["complete"] and "SAELens" in published["conventions"]
    rows = published["rows"]
    # n = 3 * 32 = 96; d = 4 matches n' = 12 dense latents, one size between (34); two seeds each
    points = sorted({(r["arch"], r["n_latents"], r["degree"], r["control"]) for r in rows}, key=str)
    assert points == sorted({("topk", 96, 32, None), ("topk", 12, 32, None), ("topk", 34, 32, None),
                             ("expander", 96, 4, None), ("expander", 96, 4, "paper")}, key=str)
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["tokens_trained"] >= 1536 and r["ce_convention"] == "saelens" and r["bos_id"] == 1
        assert r["ce_recovered_low"] <= r["ce_recovered"] <= r["ce_recovered_high"]
        assert r["delta_ce"] == pytest.approx(r["ce_sae"] - r["ce_clean"], abs=1e-9)
        assert r["model_sha256"] and len(r["model_sha256"]) == 64
        assert r["test_tokens"] >= 200 and r["firing_density_tokens"] == 3000
        assert (runs / _name(r) / "firing_density.png").stat().st_size > 1000
        # CE_zero zeroes every position: a bias-free Llama then predicts uniformly
        assert r["ce_zero"] == pytest.approx(math.log(VOCAB), abs=1e-3)
    grid = [r for r in rows if r["control"] is None]
    assert sorted(r["seed"] for r in grid if r["arch"] == "expander") == [0, 1]
    assert [r["storage_ratio"] for r in grid if r["matched_degree"] == 4] == [pytest.approx(1.0)] * 2
    assert {r["other_params"] for r in grid if r["arch"] == "topk" and r["n_latents"] == 96} == {96 * 32 + 96 + 32}
    control = next(r for r in rows if r["control"] == "paper")
    assert (control["signed"], control["b_dec_init"], control["lr_schedule"], control["resample_every"],
            control["lr"]) == (True, "zero", "cosine", 4, 3e-4)
    assert control["paper_ce_convention"] == "paper" and "paper_ce_recovered" in control
    # the paper's CE_zero averages over every prediction, uniform too
    assert control["paper_ce_zero"] == pytest.approx(control["ce_zero"], abs=1e-3)
    sweeps = published["sweeps"]
    assert {(s["arch"], s["n_latents"]) for s in sweeps} == {("topk", 96), ("topk", 12), ("topk", 34),
                                                            ("expander", 96)}
    for s in sweeps:
        assert f"{s['lr']:.3g}" == min(s["val_fvu"], key=s["val_fvu"].get)
        assert len(s["val_fvu"]) in (2, 3)
    for r in grid:
        sweep = next(s for s in sweeps if (s["arch"], s["n_latents"], s["degree"]) ==
                     (r["arch"], r["n_latents"], r["degree"] if r["arch"] == "expander" else None))
        assert r["lr"] == sweep["lr"]
    assert {s["n_latents"] for s in published["summary"]} >= {12, 34, 96}
    assert (out / "frontier.png").stat().st_size > 5000

    # results/tables.py: one line per point, then the Expander against its storage match, then the control
    text = render(published)
    lines = [ln for ln in text.splitlines() if ln.startswith("| 5 |")]
    assert len(lines) == 4 + 1, text
    exp = [r["ce_recovered"] for r in grid if r["arch"] == "expander"]
    matched = [r["ce_recovered"] for r in grid if r["arch"] == "topk" and r["n_latents"] == 12]
    assert lines[-1].startswith("| 5 | 4 |") and f"| {sum(exp) / 2 - sum(matched) / 2:+.4f} |" in lines[-1]
    assert f"{control['ce_recovered']:.4f}" in text and f"{control['paper_ce_recovered']:.4f}" in text

    # An independent recomputation for a saved SAE file agrees with its row within 0.01 nats.
    from sae.checkpoint import load_sae
    from sae.data import load_texts, token_splits

    row = next(r for r in grid if r["arch"] == "expander" and r["seed"] == 1)
    sae = load_sae(runs / _name(row) / "sae.safetensors").eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder / "model", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_folder / "model")
    test = token_splits(load_texts([tiny_folder / "corpus.txt"]), tok, 24).test
    assert test.numel() == row["test_tokens"]
    ce_zero, ce_sae = recompute_ce(model, test, row["layer"], sae, row["bos_id"])
    assert abs(ce_zero - row["ce_zero"]) < 0.01 and abs(ce_sae - row["ce_sae"]) < 0.01, (ce_zero, ce_sae, row)

    # A second run finds every SAE and sweep done.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier") == len(grid) and "lr sweep" not in proc.stdout

    # The CE baselines were cached once; a later sitting that evaluates again reads them back.
    from sae.evaluate import CEBaseline

    (cached,) = (tmp_path / "data" / "ce_baselines").glob("*.safetensors")
    baseline = CEBaseline.load(cached)
    assert baseline.ce_zero == pytest.approx(row["ce_zero"], abs=1e-9)
    assert baseline.ce_clean == pytest.approx(row["ce_clean"], abs=1e-9)
    (runs / _name(row) / "row.json").unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"read from {cached}" in proc.stdout
    again = next(r for r in json.loads((out / "frontier.json").read_text())["rows"]
                 if r["arch"] == "expander" and r["seed"] == 1 and r["control"] is None)
    assert again["ce_sae"] == row["ce_sae"] and again["ce_recovered"] == row["ce_recovered"]


def _name(r) -> str:
    from sae.cli import _point_name

    name = _point_name(r["arch"], r["k"], r["n_latents"], r["degree"] if r["arch"] == "expander" else None, r["seed"])
    return ("control_paper_" + name) if r["control"] else name


def test_frontier_refuses_a_small_test_split_and_bad_grid_flags(tiny_folder, tmp_path):
    env = dict(os.environ, TOPK_SAE_DATA=str(tmp_path / "data"))
    env.pop("TRITON_INTERPRET", None)
    base = [sys.executable, "-m", "sae", "frontier", "--model", str(tiny_folder / "model"), "--text",
            str(tiny_folder / "corpus.txt"), "--ctx-len", "24", "--runs", str(tmp_path / "runs")]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)  # 80,000 test tokens asked
    assert proc.returncode == 2 and "--test-fraction:" in proc.stderr and "min_test_tokens = 80,000" in proc.stderr
    # checked once the tokenizer has split the text: after the model loads, one line, no traceback
    assert "Traceback" not in proc.stderr and "--test-fraction:" in proc.stderr.strip().splitlines()[-1]
    for flags, named in ((["--seeds", "-1"], "--seeds"), (["--sweep-factors", "0"], "--sweep-factors"),
                         (["--dense-between", "-2"], "--dense-between"),
                         (["--only", "expander", "--out", str(tmp_path / "out")], "--only"),
                         (["--only", "dense", "--publish"], "--only"),
                         (["--only", "control", "--no-control"], "--only")):
        proc = subprocess.run(base + flags, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2 and f"error: {named}:" in proc.stderr, proc.stderr
    assert not [p for p in (tmp_path / "runs").glob("*") if p.is_dir()]  # no SAE was started


def test_paper_convention_table_reads_the_committed_re_evaluations():
    """results/paper_convention.json (``sae evaluate --conventions saelens paper`` on the committed
    seed-0 files) re-evaluates SAEs of the committed frontier: its SAELens numbers must be those
    rows' own (same split, same code), and the table's share is computed from the file."""
    from tables import paper_table

    from sae.cli import _point_name

    results = Path(__file__).resolve().parents[1] / "results"
    evals = json.loads((results / "paper_convention.json").read_text())
    rows = {_point_name(r["arch"], r["k"], r["n_latents"], r["degree"], r["seed"]): r
            for r in json.loads((results / "frontier.json").read_text())["rows"] if not r.get("control")}
    assert len(evals["rows"]) >= 2
    for e in evals["rows"]:
        row = rows[e["name"]]
        assert e["decoder_values"] == row["decoder_values"] and e["test_tokens"] == row["test_tokens"]
        for key in ("ce_clean", "ce_zero", "ce_sae", "ce_recovered", "fvu"):
            assert math.isclose(e[key], row[key], rel_tol=1e-4), (e["name"], key, e[key], row[key])
        assert e["paper_ce_convention"] == "paper" and 0 < e["paper_ce_recovered"] <= 1
    text = paper_table(evals)
    dense = max((e for e in evals["rows"] if e["arch"] == "TopKSAE"), key=lambda e: e["decoder_values"])
    for e in evals["rows"]:
        assert f"{e['paper_ce_recovered']:.4f} [{e['paper_ce_recovered_low']:.4f}" in text
        if e["arch"] == "ExpanderSAE":
            assert f"{e['paper_ce_recovered'] / dense['paper_ce_recovered']:.2%} (paper convention)" in text
