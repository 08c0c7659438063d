"""The overfitting / regularization experiment on the bundled digits."""

import csv
import json

import numpy as np
import pytest
import torch

from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import regularization as R


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


def tasks(variants, cfg=R.Config()):
    data = M.load_digits()
    x = torch.from_numpy(data.x_train[: cfg.train_examples].astype(np.float32) / 255.0)
    y = torch.from_numpy(data.y_train[: cfg.train_examples])
    return [R.task(cfg, v, data, x, y) for v in variants]


def weights_norm(task):
    return sum(float(m.weight.detach().square().sum()) for m in task.model if isinstance(m, torch.nn.Linear))


def test_weight_decay_shrinks_the_weights_from_the_same_start():
    plain, decay = tasks(["plain", "weight-decay"])
    assert weights_norm(plain) == weights_norm(decay)  # the same initial weights
    for step in range(60):
        plain.train_step(step), decay.train_step(step)
    assert weights_norm(decay) < 0.9 * weights_norm(plain)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.model)


def test_dropout_masks_are_reproducible_and_resume_exactly():
    """Dropout draws its masks from the run's own generator (saved in the checkpoint), not torch's
    global one: an interrupted and resumed run equals an uninterrupted one, and the global
    generator is left alone."""
    whole, first, second = tasks(["dropout", "dropout", "dropout"])
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in whole.model) == R.Config().hidden_layers
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for step in range(40):
        whole.train_step(step)
    assert torch.equal(torch.get_rng_state(), before)
    for step in range(20):
        first.train_step(step)
    second.load_state_tensors(first.state_tensors())
    for step in range(20, 40):
        second.train_step(step)
    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
    assert whole.evaluate(40)["test_accuracy"] == second.evaluate(40)["test_accuracy"]


def test_quick_run_writes_metrics_figure_and_resumes(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    assert cli.main(["reproduce", "regularization", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bundled 8x8 digits" in printed and "best test" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["variants"] == list(R.VARIANTS) and summary["epochs"] == list(range(11))
    for v in R.VARIANTS:
        final = summary["final"][v]
        assert 0.1 < final["test"] <= final["best_test"] <= 1 and 0.1 < final["train"] <= 1, (v, final)
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["variant", "epoch", "train_accuracy", "test_accuracy"] and len(rows) == 1 + 4 * 11
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    (out / "figure.png").unlink()
    assert cli.main(["plot", str(out)]) == 0 and (out / "figure.png").exists()
    assert R.run(R.load_config(out), resume=True) == summary
    assert cli.main(["reproduce", "regularization", "--quick", "--variants", "plain,ln",
                     "--out", str(tmp_path / "other")]) == 2
    assert "unknown variant 'ln'" in capsys.readouterr().err and not (tmp_path / "other").exists()
