"""Every Python block in README.md runs as written, with the public names it imports."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": f"readme_{index}"})


def test_public_api():
    import sae

    for name in ("TopKSAE", "ExpanderSAE", "SparseDecoder", "SAEOutput", "expander_mask", "load_sae",
                 "TrainConfig", "train", "SAEConfig"):
        assert getattr(sae, name) is not None, name
    assert set(sae.__all__) >= {"TopKSAE", "ExpanderSAE", "load_sae", "train", "TrainConfig"}
    with pytest.raises(AttributeError, match="no attribute"):
        sae.NotAName
