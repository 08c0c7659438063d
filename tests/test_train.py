"""The training loop: checkpoints, exact resume, corrupt files, deferred Ctrl-C."""

import os
import signal

import pytest
import torch

from bnlab.train import CHECKPOINT, CheckpointError, Interrupted, LoopConfig, fit, load_checkpoint


class Regression:
    """Least squares by SGD on random mini-batches: deterministic given the seed."""

    def __init__(self, interrupt_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(200, 3, generator=g, dtype=torch.float64)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        self.w = torch.zeros(3, dtype=torch.float64)
        self.sampler = torch.Generator().manual_seed(1)
        self.interrupt_at = interrupt_at

    def train_step(self, step):
        i = torch.randint(0, 200, (8,), generator=self.sampler)
        grad = self.x[i].T @ (self.x[i] @ self.w - self.y[i]) / 8
        self.w -= 0.1 * grad
        if step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C arrived in the middle of this step

    def evaluate(self, step):
        return {"loss": float(((self.x @ self.w - self.y) ** 2).mean())}

    def state_tensors(self):
        return {"w": self.w, "rng": self.sampler.get_state()}

    def load_state_tensors(self, t):
        self.w = t["w"].clone()
        self.sampler.set_state(t["rng"])


def config(tmp_path, steps=60):
    return LoopConfig(steps=steps, eval_every=10, checkpoint_every=20, out=tmp_path, desc="test")


def test_resume_reaches_the_same_metrics(tmp_path):
    full = fit(Regression(), config(tmp_path / "full"), progress=lambda n: None)
    assert [r["step"] for r in full] == list(range(0, 61, 10)) and full[-1]["loss"] < full[0]["loss"] / 10
    fit(Regression(), config(tmp_path / "part", steps=40), progress=lambda n: None)
    resumed = fit(Regression(), config(tmp_path / "part"), resume=True, progress=lambda n: None)
    assert resumed == full
    assert not list(tmp_path.rglob("*.tmp"))


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    full = fit(Regression(), config(tmp_path / "full"), progress=lambda n: None)
    with pytest.raises(Interrupted) as info:
        fit(Regression(interrupt_at=24), config(tmp_path / "cut"), progress=lambda n: None)
    assert info.value.step == 25
    _, step, _ = load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert step == 25
    assert fit(Regression(), config(tmp_path / "cut"), resume=True, progress=lambda n: None) == full


def test_corrupt_or_missing_checkpoint_is_a_clear_error_and_kept(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fit(Regression(), config(tmp_path), resume=True, progress=lambda n: None)
    fit(Regression(), config(tmp_path, steps=20), progress=lambda n: None)
    path = tmp_path / CHECKPOINT
    damaged = path.read_bytes()[:-7]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(Regression(), config(tmp_path), resume=True, progress=lambda n: None)
    assert path.read_bytes() == damaged  # nothing overwritten


def test_checkpoint_of_another_model_is_refused(tmp_path):
    fit(Regression(), config(tmp_path, steps=20), progress=lambda n: None)

    class Other(Regression):
        def load_state_tensors(self, t):
            raise KeyError("layer.weight")

    with pytest.raises(CheckpointError, match="does not match"):
        fit(Other(), config(tmp_path), resume=True, progress=lambda n: None)
