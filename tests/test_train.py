"""The trainer: kill-and-resume lands on the same final step and weights as an uninterrupted run;
bad checkpoints are refused; the learning-rate schedule."""

import pytest
import torch

from sae.data import ActivationBuffer
from sae.models import ExpanderSAE, TopKSAE
from sae.train import CHECKPOINT, CheckpointError, TrainConfig, _lr_at, load_checkpoint, train


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
