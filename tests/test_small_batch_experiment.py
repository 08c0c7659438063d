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


def test_any_idx_dataset_in_mnists_layout_runs_with_data_dir(tmp_path, capsys):
    """The issue's "any IDX dataset with --data-dir": 10x10 images of 3 classes (not MNIST, so no
    MD5 to match) train end to end, and the run records where its data came from."""
    import numpy as np

    from bnlab import data as D

    folder, rng = tmp_path / "idx", np.random.default_rng(0)
    folder.mkdir()
    for split, n in (("train", 64), ("t10k", 20)):
        D.write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 10, 10), dtype=np.uint8))
        D.write_idx(folder / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 3).astype(np.uint8))
    out = tmp_path / "run"
    assert cli.main(["reproduce", "small-batch", "--data-dir", str(folder), "--examples", "32", "--batch-sizes", "4",
                     "--methods", "bn,cbn", "--out", str(out)]) == 0
    assert "IDX dataset in MNIST's layout" in capsys.readouterr().out
    record = json.loads((out / "config.json").read_text())
    assert "not MNIST" in record["data"] and str(folder) in record["data"]
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    assert set(accuracy) == {"bn", "cbn"} and all(0.0 <= accuracy[m]["4"] <= 1.0 for m in accuracy)


@pytest.mark.parametrize("drop", [1.0, 0.1])
def test_lr_drop_divides_the_learning_rate_where_cbn_starts_pooling(no_mnist, drop):
    """``--lr-drop``: every method's learning rate is base_lr * batch / 32 until the burn-in's end,
    the step CBN's layers start pooling, and ``drop`` times that after it; a resumed run, which
    starts at a later step, follows the same schedule."""
    from bnlab.data import load_dataset

    cfg = small_batch.Config(examples=40, burn_in=0.5, lr_drop=drop)
    task = small_batch.RunTask(cfg, "cbn", 4, load_dataset(None, False))
    assert task.steps == 10 and all(norm.burn_in == 5 for norm in (*task.model.norms, task.model.fc_norm))
    rates = []
    for step in range(task.steps):
        task.train_step(step)
        rates.append(task.opt.param_groups[0]["lr"])
    assert rates == pytest.approx([0.02 * 4 / 32] * 5 + [0.02 * 4 / 32 * drop] * 5)
    resumed = small_batch.RunTask(cfg, "cbn", 4, load_dataset(None, False))
    resumed.train_step(7)
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(0.02 * 4 / 32 * drop)


def test_lr_drop_outside_0_1_is_refused():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"--lr-drop must be in \(0, 1\]"):
            small_batch.Config(lr_drop=bad)
