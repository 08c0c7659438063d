"""The weight-initialization sweep (the textbook's BN experiment) on the bundled digits."""

import csv
import json

import pytest
import torch

from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import init_sweep


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


@pytest.fixture(scope="module")
def digits():
    return M.load_digits()


def test_bn_learns_at_scales_where_the_plain_network_cannot(tmp_path, digits):
    """The textbook's claim, as values: at std 1e-2 and 1e-3 the plain network's activations vanish
    through five layers and it stays at chance, while the same network with BN, from the same
    weights on the same batches, fits the training set."""
    cfg = init_sweep.Config(out=str(tmp_path), stds=2, std_log10_max=-2.0, std_log10_min=-3.0)
    summary = init_sweep.sweep(cfg, digits)
    assert summary["stds"] == pytest.approx([1e-2, 1e-3])
    for plain, bn in zip(summary["final"]["plain"], summary["final"]["bn"]):
        assert plain < 0.2 and bn > 0.6, summary["final"]
    for name in ("plain", "bn"):  # step 0 and one row per epoch
        assert all(len(curve) == cfg.epochs + 1 for curve in summary["train_accuracy"][name])


def test_both_networks_start_from_the_same_weights():
    cfg = init_sweep.Config()
    plain, bn = (init_sweep.mlp(64, 10, cfg, batch_norm) for batch_norm in (False, True))
    for model in (plain, bn):
        init_sweep.init_weights_(model, 0.05, seed=3)
    weights = [[m.weight for m in model if isinstance(m, torch.nn.Linear)] for model in (plain, bn)]
    assert len(weights[0]) == len(weights[1]) == cfg.hidden_layers + 1
    for a, b in zip(*weights):
        assert torch.equal(a, b)
    assert 0.045 < weights[0][0].std().item() < 0.055  # drawn from N(0, 0.05^2)
    assert all(m.bias is None for m in bn if isinstance(m, torch.nn.Linear) and m is not bn[-1])
    assert sum(isinstance(m, init_sweep.bnlab.BatchNorm1d) for m in bn) == cfg.hidden_layers
    assert all(m.eps == cfg.eps for m in bn if isinstance(m, init_sweep.bnlab.BatchNorm1d))


def test_quick_run_writes_metrics_figure_and_resumes(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    assert cli.main(["reproduce", "init-sweep", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bundled 8x8 digits" in printed and "with BN at" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["stds"]) == 4 and summary["stds"][0] == pytest.approx(1.0)
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["std", "network", "epoch 0"] and len(rows) == 1 + 2 * 4
    assert [float(a) for a in rows[1 + 4][2:]] == pytest.approx(summary["train_accuracy"]["bn"][0], abs=1e-4)
    (out / "figure.png").unlink()
    assert cli.main(["plot", str(out)]) == 0 and (out / "figure.png").exists()
    # Every run finished: resuming trains nothing and reports the same numbers.
    assert init_sweep.run(init_sweep.load_config(out), resume=True) == summary
    assert cli.main(["reproduce", "init-sweep", "--quick", "--out", str(out)]) == 2  # never overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_more_training_examples_than_the_data_holds_is_refused(tmp_path, digits):
    with pytest.raises(ValueError, match="--train-examples must be 1..1438"):
        init_sweep.sweep(init_sweep.Config(out=str(tmp_path), train_examples=5000), digits)


def test_the_command_line_names_a_bad_setting_without_a_traceback(tmp_path, no_mnist, capsys):
    assert cli.main(["reproduce", "init-sweep", "--train-examples", "5000", "--out", str(tmp_path / "r")]) == 2
    assert "bnlab: error: --train-examples must be 1..1438" in capsys.readouterr().err
