"""The textbook's sweeps (init scale, learning rate) with and without BN, on the bundled digits."""

import csv
import json

import pytest
import torch

import bnlab
from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import init_sweep, lr_sweep, sweeps


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


@pytest.fixture(scope="module")
def digits():
    return M.load_digits()


def test_bn_learns_at_init_scales_where_the_plain_network_cannot(tmp_path, digits):
    """The textbook's claim, as values: at std 1e-2 and 1e-3 the plain network's activations vanish
    through five layers and it stays at chance, while the same network with BN, from the same
    weights on the same batches, fits the training set."""
    cfg = init_sweep.Config(out=str(tmp_path), stds=2, std_log10_max=-2.0, std_log10_min=-3.0)
    summary = init_sweep.sweep(cfg, digits)
    assert summary["axis"] == "init std" and summary["values"] == pytest.approx([1e-2, 1e-3])
    for plain, bn in zip(summary["final"]["plain"], summary["final"]["bn"]):
        assert plain < 0.2 and bn > 0.6, summary["final"]
    for name in ("plain", "bn"):  # step 0 and one row per epoch
        assert all(len(curve) == cfg.epochs + 1 for curve in summary["train_accuracy"][name])


def test_bn_trains_at_a_learning_rate_where_the_plain_network_diverges(tmp_path, digits):
    """Ioffe & Szegedy's section 3.3, as values: from He's init both networks train at 0.1; at 1
    the plain network diverges to chance and the one with BN fits the training set."""
    cfg = lr_sweep.Config(out=str(tmp_path), lrs=2, lr_log10_max=0.0, lr_log10_min=-1.0)
    summary = lr_sweep.sweep(cfg, digits)
    assert summary["axis"] == "learning rate" and summary["values"] == pytest.approx([1.0, 0.1])
    (plain_high, plain_low), (bn_high, bn_low) = summary["final"]["plain"], summary["final"]["bn"]
    assert plain_low > 0.9 and bn_low > 0.9
    assert plain_high < 0.2 and bn_high > 0.9


def test_both_networks_start_from_the_same_weights():
    cfg = init_sweep.Config()
    plain, bn = (sweeps.mlp(64, 10, cfg, batch_norm) for batch_norm in (False, True))
    for model in (plain, bn):
        sweeps.init_weights_(model, 0.05, seed=3)
    weights = [[m.weight for m in model if isinstance(m, torch.nn.Linear)] for model in (plain, bn)]
    assert len(weights[0]) == len(weights[1]) == cfg.hidden_layers + 1
    for a, b in zip(*weights):
        assert torch.equal(a, b)
    assert 0.045 < weights[0][0].std().item() < 0.055  # drawn from N(0, 0.05^2)
    assert all(m.bias is None for m in bn if isinstance(m, torch.nn.Linear) and m is not bn[-1])
    assert sum(isinstance(m, bnlab.BatchNorm1d) for m in bn) == cfg.hidden_layers
    assert all(m.eps == cfg.eps for m in bn if isinstance(m, bnlab.BatchNorm1d))
    sweeps.init_weights_(plain, None, seed=3)  # He's: sqrt(2 / fan_in) per layer
    assert 0.9 < plain[0].weight.std().item() / (2 / 64) ** 0.5 < 1.1
    assert 0.9 < plain[2].weight.std().item() / (2 / 100) ** 0.5 < 1.1


@pytest.mark.parametrize("experiment, module, count", [("init-sweep", init_sweep, 4), ("lr-sweep", lr_sweep, 3)])
def test_quick_run_writes_metrics_figure_and_resumes(tmp_path, no_mnist, capsys, experiment, module, count):
    out = tmp_path / "run"
    assert cli.main(["reproduce", experiment, "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bundled 8x8 digits" in printed and "with BN at" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["values"]) == count and summary["values"][0] > summary["values"][-1]
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == [summary["axis"], "network", "epoch 0"] and len(rows) == 1 + 2 * count
    assert [float(a) for a in rows[1 + count][2:]] == pytest.approx(summary["train_accuracy"]["bn"][0], abs=1e-4)
    (out / "figure.png").unlink()
    assert cli.main(["plot", str(out)]) == 0 and (out / "figure.png").exists()
    # Every run finished: resuming trains nothing and reports the same numbers.
    assert module.run(module.load_config(out), resume=True) == summary
    assert cli.main(["reproduce", experiment, "--quick", "--out", str(out)]) == 2  # never overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_the_command_line_names_a_bad_setting_without_a_traceback(tmp_path, no_mnist, capsys):
    assert cli.main(["reproduce", "init-sweep", "--train-examples", "5000", "--out", str(tmp_path / "r")]) == 2
    assert "bnlab: error: --train-examples must be 1..1438" in capsys.readouterr().err
