"""Random hyperparameter search on a validation split, on the bundled digits."""

import json

import numpy as np
import pytest

from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import hparam_search as H


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


def test_the_validation_split_is_held_out_of_training():
    cfg = H.Config()
    (x, y), (x_val, y_val), train_idx, val_idx = H.split(cfg, M.load_digits())
    assert len(val_idx) == 100 and len(train_idx) == 400 and len(x_val) == 100 and len(x) == 400
    assert set(train_idx).isdisjoint(val_idx) and set(train_idx) | set(val_idx) == set(range(500))
    draws = cfg.draws()
    assert len(draws) == 100 and all(1e-6 <= lr <= 1e-2 and 1e-8 <= wd <= 1e-4 for lr, wd in draws)
    assert draws == H.Config().draws()  # the same trials for the same seed


def test_quick_search_picks_by_validation_measures_the_test_set_once_and_resumes(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    assert cli.main(["reproduce", "hparam-search", "--quick", "--lr-log10=-3,-1", "--out", str(out)]) == 0
    assert "measured once" in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == len(summary["trials"]) == 2 * 6
    assert not any("test_accuracy" in t for t in summary["trials"])  # the search never saw the test set
    for network, best in summary["best"].items():
        trials = [t for t in summary["trials"] if t["network"] == network]
        ranked = sorted(t["validation_accuracy"] for t in trials)[::-1]
        assert [t["validation_accuracy"] for t in best["top"]] == ranked[:3]
        # the winner trained again is the same run: the same validation accuracy, then the test set
        assert best["validation_accuracy_retrained"] == best["top"][0]["validation_accuracy"]
        assert 0 <= best["test_accuracy"] <= 1
        low, high = best["lr_log10_range"]
        assert -3 <= low <= high <= -1
        assert low == pytest.approx(min(np.log10(t["lr"]) for t in best["top"]))
    assert not list((out / "trials").glob("*/checkpoint.safetensors"))  # finished trials keep their row only
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    # resuming a finished search trains nothing and appends nothing
    assert H.run(H.load_config(out), resume=True) == summary
    assert len((out / "trials.jsonl").read_text().splitlines()) == 12
    assert cli.main(["reproduce", "hparam-search", "--quick", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_malformed_range_is_named(tmp_path, no_mnist, capsys):
    assert cli.main(["reproduce", "hparam-search", "--quick", "--lr-log10", "-3", "--out", str(tmp_path / "r")]) == 2
    assert "--lr-log10 takes two finite numbers a,b" in capsys.readouterr().err
