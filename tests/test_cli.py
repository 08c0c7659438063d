"""The command line refuses settings that cannot run: a one-line error naming the flag, exit code 2,
before any data is loaded or any run folder made (never a traceback, never a silent nonsense run)."""

import json
import re

import pytest

from bnlab import cli
from bnlab.data import mnist as M


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


@pytest.mark.parametrize("args, message", [
    # each of these ran before: a ZeroDivisionError, an IndexError, or a silent run of nonsense
    (["bn-mnist", "--steps", "-5"], "--steps must be positive, got -5"),
    (["bn-mnist", "--batch-size", "1"], "--batch-size must be at least 2, got 1"),
    (["bn-mnist", "--eval-every", "0"], "--eval-every must be positive"),
    (["bn-mnist", "--threshold", "300"], r"--threshold must be in \[1, 255\], got 300"),  # all-zero images
    (["bn-mnist", "--width", "50", "--unit", "50"], r"--unit must be in \[0, 49\], got 50"),
    (["bn-mnist", "--workers", "0"], r"--workers must be in \[1, 2\]"),
    (["small-batch", "--batch-sizes", "8,x"], "--batch-sizes takes a comma-separated list of int values"),
    (["small-batch", "--batch-sizes", "8,1"], "--batch-sizes must each be at least 2"),
    (["small-batch", "--examples", "10"], r"--examples must be at least 32 \(the largest batch size\), got 10"),
    (["small-batch", "--burn-in", "2"], r"--burn-in must be in \[0, 1\]"),
    (["small-batch", "--methods", "bn,ln"], "unknown method 'ln'"),
    # the same runs twice, and one row or column of the table for both
    (["small-batch", "--methods", "bn,cbn,bn"], "--methods lists bn more than once"),
    (["small-batch", "--batch-sizes", "4,8,4"], "--batch-sizes lists 4 more than once"),
    (["regularization", "--variants", "bn,plain,bn"], "--variants lists bn more than once"),
    (["small-batch", "--nproc", "3"], "--nproc 3 must divide every batch size"),  # (was raised mid-run)
    (["init-sweep", "--batch", "0"], "--batch must be at least 2"),
    (["lr-sweep", "--lrs", "0"], "--lrs must be positive"),
    (["lr-sweep", "--lr-log10-max", "-1", "--lr-log10-min", "-1"], "--lr-log10-max and --lr-log10-min are both -1"),
    (["init-sweep", "--std-log10-min", "nan"], "--std-log10-min must be a finite number"),
    (["bn-mnist", "--lr", "inf"], "--lr must be a finite number, got inf"),  # (inf passed "positive")
    (["regularization", "--dropout", "1"], r"--dropout must be in \[0, 1\)"),
    (["regularization", "--variants", "bn,l1"], "unknown variant 'l1'"),
    (["hparam-search", "--trials", "0"], "--trials must be positive"),
    (["hparam-search", "--lr-log10=-3"], "--lr-log10 takes two finite numbers a,b"),
    (["hparam-search", "--weight-decay-log10=nan,-2"], "--weight-decay-log10 takes two finite numbers a,b"),
])
def test_a_bad_setting_is_refused_before_anything_runs(tmp_path, no_mnist, capsys, args, message):
    out = tmp_path / "run"
    assert cli.main(["reproduce", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_fewer_trials_than_best_is_fine(tmp_path, no_mnist, capsys):
    """--best defaults to 20: a search of 2 trials shows both rather than refusing."""
    assert cli.main(["reproduce", "hparam-search", "--trials", "2", "--epochs", "1", "--train-examples", "100",
                     "--out", str(tmp_path / "run")]) == 0
    best = json.loads((tmp_path / "run" / "metrics.json").read_text())["best"]
    assert [len(best[network]["top"]) for network in sorted(best)] == [2, 2]


def test_a_resumed_run_whose_config_was_edited_into_nonsense_is_refused(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = {"experiment": "init-sweep", "config": {"out": str(out), "epochs": 0}}
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["reproduce", "init-sweep", "--resume", str(out)]) == 2
    assert "--epochs must be positive, got 0" in capsys.readouterr().err


def test_resume_refuses_flags_that_would_change_the_recorded_settings(tmp_path, no_mnist, capsys):
    """--resume used to ignore every other flag silently; now a flag that changes a recorded setting
    is refused with the recorded value, while repeating the original command line with --resume
    added, or changing how the run runs (--checkpoint-every), continues it."""
    from bnlab.experiments import small_batch

    out = tmp_path / "run"
    first = ["reproduce", "small-batch", "--quick", "--examples", "40", "--batch-sizes", "4", "--methods", "bn",
             "--out", str(out)]
    assert cli.main(first) == 0
    capsys.readouterr()
    for flags, message in [(["--lr-drop", "0.1"], r"--lr-drop 0.1 \(recorded: 1.0\)"),
                           (["--methods", "bn,gn", "--seed", "3"], r"--methods bn,gn \(recorded: bn\), --seed 3"),
                           (["--quick"], r"--quick's --examples 1600 \(recorded: 40\)")]:
        assert cli.main(["reproduce", "small-batch", "--resume", str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "would change them" in err, err
    assert cli.main([*first, "--resume", str(out), "--checkpoint-every", "7"]) == 0
    assert small_batch.load_config(out).examples == 40


@pytest.mark.parametrize("experiment", ["bn-mnist", "small-batch", "init-sweep", "regularization", "hparam-search"])
def test_an_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, no_mnist, capsys, experiment):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out, message in [(afile, "is a file, not a folder"), (afile / "sub", "cannot make the run folder")]:
        assert cli.main(["reproduce", experiment, "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnlab: error: --out ") and message in err and len(err.strip().splitlines()) == 1, err
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("experiment", ["bn-mnist", "small-batch", "init-sweep", "regularization", "hparam-search"])
def test_data_that_cannot_load_leaves_no_empty_run_folder(tmp_path, no_mnist, capsys, experiment):
    """The run folder is claimed before the data loads (an existing run is refused first); a data
    error then left an empty ``runs/<experiment>-<time>`` behind, which ``bnlab plot`` and
    ``--resume`` refuse. Folders the command made are removed; one that was there stays."""
    empty = tmp_path / "no-data"
    empty.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    for out in (tmp_path / "runs" / "new", mine):
        assert cli.main(["reproduce", experiment, "--quick", "--data-dir", str(empty), "--out", str(out)]) == 2
        assert "no dataset in MNIST's layout" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert mine.is_dir() and not any(mine.iterdir())


def run_folder(tmp_path, config_text: str):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(config_text)
    return out


@pytest.mark.parametrize("command, config_text, message", [
    (["plot"], None, "is not a bnlab run folder: it has no config.json"),
    (["plot"], "{not json", "config.json cannot be read"),
    (["plot"], json.dumps({"experiment": "small-batch", "config": {}}),
     "has no metrics.json: the run has not finished; continue it with bnlab reproduce small-batch --resume"),
    (["plot"], json.dumps({"experiment": "gan", "config": {}}), "holds a run of 'gan', which this version"),
    # (resuming another experiment's folder used to drop its settings silently and start afresh)
    (["reproduce", "init-sweep", "--resume"], json.dumps({"experiment": "lr-sweep", "config": {}}),
     "holds a lr-sweep run, not init-sweep; continue it with bnlab reproduce lr-sweep --resume"),
    (["reproduce", "bn-mnist", "--resume"], None, "is not a bnlab run folder"),
])
def test_a_folder_that_is_not_the_run_asked_for_is_named_without_a_traceback(tmp_path, no_mnist, capsys, command,
                                                                             config_text, message):
    out = run_folder(tmp_path, config_text) if config_text is not None else tmp_path / "nothing-here"
    assert cli.main([*command, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and message in err, err


@pytest.mark.parametrize("metrics_text, message", [
    ("{bad", "metrics.json cannot be read"),
    ("[1, 2]", "metrics.json holds no run's results"),
    ("{}", "metrics.json lacks what the figure needs (KeyError('nets'))"),
])
def test_plot_names_a_damaged_metrics_file_without_a_traceback(tmp_path, capsys, metrics_text, message):
    out = run_folder(tmp_path, json.dumps({"experiment": "bn-mnist", "config": {}}))
    (out / "metrics.json").write_text(metrics_text)
    assert cli.main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_damaged_checkpoint_is_named_in_one_line_from_a_training_process(tmp_path, no_mnist, capsys):
    """bn-mnist trains its two networks in two processes: a checkpoint one of them cannot read is
    the parent's one-line error, as in one process (it was a traceback around the worker's)."""
    out = tmp_path / "run"
    args = ["reproduce", "bn-mnist", "--steps", "40", "--checkpoint-every", "20", "--eval-every", "20",
            "--recalibration-batches", "2", "--probe-examples", "50", "--workers", "2"]
    assert cli.main([*args, "--out", str(out)]) == 0
    (out / "metrics.json").unlink()  # (as if cut short after its last checkpoint)
    (out / "bn" / "checkpoint.safetensors").write_bytes(b"\x00" * 100)
    capsys.readouterr()
    assert cli.main(["reproduce", "bn-mnist", "--resume", str(out)]) == 2
    err = capsys.readouterr().err  # (after the progress bar's line)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("bnlab: error: "), err
    assert "bn/checkpoint.safetensors: the checkpoint is corrupt or not bnlab's" in err


def test_a_refusal_raised_in_a_spawned_process_is_rebuilt_from_its_traceback():
    """torch.multiprocessing.spawn (small-batch's --nproc) hands the parent a worker's traceback as
    text: a checkpoint, data or settings error comes back as itself, one line; others do not."""
    import traceback

    from bnlab.data import DataError
    from bnlab.experiments import runs
    from bnlab.train import CheckpointError

    for error in (CheckpointError("run/rank1/checkpoint.safetensors: corrupt"), DataError("x: truncated"),
                  runs.ConfigError("--steps must be positive, got 0"), RuntimeError("a bug")):
        try:
            try:
                raise ValueError("the cause")
            except ValueError as cause:
                raise error from cause
        except Exception:
            text = "\n\n-- Process 1 terminated with the following error:\n" + traceback.format_exc()
        rebuilt = runs.worker_refusal(text)
        if isinstance(error, RuntimeError) and not isinstance(error, CheckpointError):
            assert rebuilt is None
        else:
            assert type(rebuilt) is type(error) and str(rebuilt) == str(error)


def test_a_figure_says_which_data_the_run_trained_on(tmp_path):
    """The fallback data (scikit-learn's 8x8 digits) must not pass for MNIST in a figure: every
    experiment's figure.png carries the data its run recorded as a footnote."""
    from bnlab.experiments import runs

    out = run_folder(tmp_path, json.dumps({"experiment": "bn-mnist", "config": {},
                                           "data": "scikit-learn's bundled 8x8 digits (MNIST not found)"}))
    plt = runs.pyplot()
    fig, _ = plt.subplots()
    texts = []
    fig.text = lambda *args, **kwargs: texts.append(args[2])  # (the footnote's string)
    assert runs.save_figure(fig, out, dpi=50).is_file()
    assert texts == ["data: scikit-learn's bundled 8x8 digits (MNIST not found)"]
    fig, _ = plt.subplots()
    fig.text = lambda *args, **kwargs: texts.append(args[2])
    runs.save_figure(fig, tmp_path, dpi=50)  # (no run record: no footnote)
    assert len(texts) == 1
