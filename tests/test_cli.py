"""``python -m sae``: the commands exist, and the frontier runs end to end on a tiny random-weight
transformers model with a tokenizer trained on the spot (no files from any hub)."""

import json
import subprocess
import sys

import pytest

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
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tiny")
    words = "the cat sat on a mat and saw many dogs run over hills while birds sang in old trees".split()
    import random

    rng = random.Random(0)
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(12))
    (root / "corpus.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    config = transformers.LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, bos_token_id=fast.bos_token_id)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return root


def test_frontier_end_to_end(tiny_model, tmp_path):
    env_data = tmp_path / "data"
    cmd = [sys.executable, "-m", "sae", "frontier", "--model", str(tiny_model / "model"),
           "--text", str(tiny_model / "corpus.txt"), "--layer", "1", "--ctx-len", "32", "--eval-contexts", "4",
           "--expansion", "2", "--ks", "4", "--degrees", "3", "--tokens", "4096", "--batch-size", "128",
           "--checkpoint-every", "8", "--no-progress", "--out", str(tmp_path / "results"),
           "--runs", str(tmp_path / "runs")]
    import os

    env = dict(os.environ, TOPK_SAE_DATA=str(env_data))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "results" / "frontier.json").read_text())["rows"]
    assert [(r["arch"], r["degree"]) for r in rows] == [("topk", 32), ("expander", 3)]
    fields = {"model", "layer", "arch", "n_latents", "k", "degree", "decoder_values", "tokens_trained", "fvu",
              "rel_err", "dead_fraction", "ce_clean", "ce_zero", "ce_sae", "ce_recovered"}
    for r in rows:
        assert fields <= set(r), fields - set(r)
        assert r["tokens_trained"] >= 4096 and r["n_latents"] == 64
    assert rows[0]["decoder_values"] == 64 * 32 and rows[1]["decoder_values"] == 64 * 3
    assert (tmp_path / "results" / "frontier.png").stat().st_size > 1000
    # A second run finds every SAE done and rewrites the same rows.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and proc.stdout.count("done earlier") == 2
