"""The small-batch experiment end to end on the bundled digits (tiny runs)."""

import json

import pytest

from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import small_batch


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


def test_quick_run_writes_table_metrics_figure_and_resumes(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    cfg = small_batch.Config(out=str(out), examples=240, batch_sizes="8,4", methods="bn,gn,brn,cbn-naive,cbn",
                             checkpoint_every=20)
    summary = small_batch.run(cfg)
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "cbn-naive" in printed
    assert set(summary["accuracy"]) == set(small_batch.METHODS)
    for key in ("accuracy", "accuracy_population"):
        for method, by_batch in summary[key].items():
            for batch, accuracy in by_batch.items():
                assert 0.1 < accuracy <= 1.0, (key, method, batch)  # trained past chance on 10 classes
    assert "population statistics" in printed
    # Group Norm has no statistics to recompute, Batch Renorm keeps its moving averages.
    assert summary["accuracy_population"]["gn"] == summary["accuracy"]["gn"]
    assert summary["accuracy_population"]["brn"] == summary["accuracy"]["brn"]
    assert summary["accuracy_population"]["bn"] != summary["accuracy"]["bn"]
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text()) == summary
    (out / "figure.png").unlink()
    assert cli.main(["plot", str(out)]) == 0 and (out / "figure.png").exists()
    # Every run finished: resuming recomputes nothing and reports the same table.
    assert small_batch.run(small_batch.load_config(out), resume=True) == summary
    # A run finished before the population metric existed gets it from its checkpoint.
    from bnlab.train import load_checkpoint, save_checkpoint

    path = out / "cbn-b4" / "checkpoint.safetensors"
    tensors, step, rows = load_checkpoint(path)
    del rows[-1]["test_accuracy_population"]
    save_checkpoint(path, tensors, step, rows)
    assert small_batch.run(small_batch.load_config(out), resume=True) == summary
    with pytest.raises(FileExistsError):
        small_batch.run(cfg)


def test_syncbn_over_two_processes_trains_like_bn(tmp_path, no_mnist):
    cfg = small_batch.Config(out=str(tmp_path / "run"), examples=60, batch_sizes="4", methods="bn", nproc=2)
    summary = small_batch.run(cfg)
    # The same training up to rounding (15 steps: the deeper net amplifies rounding over long runs).
    assert abs(summary["accuracy"]["syncbn"]["4"] - summary["accuracy"]["bn"]["4"]) < 0.01


def test_unknown_method_and_indivisible_nproc_are_refused(tmp_path, no_mnist):
    with pytest.raises(ValueError, match="unknown method"):
        small_batch.run(small_batch.Config(out=str(tmp_path / "a"), examples=40, batch_sizes="4", methods="ln"))
    with pytest.raises(ValueError, match="must divide"):
        small_batch.run(small_batch.Config(out=str(tmp_path / "b"), examples=40, batch_sizes="3", methods="bn",
                                           nproc=2))
