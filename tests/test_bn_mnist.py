"""The BN paper's MNIST experiment end to end: outputs, determinism, resume after kill -9, errors."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bnlab import cli
from bnlab.data import mnist as M
from bnlab.experiments import bn_mnist

FAST = dict(steps=300, eval_every=100, checkpoint_every=100, recalibration_batches=20, probe_examples=200)


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    """Make sure MNIST is nowhere to be found: the run uses the embedded digits."""
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)


def run_quietly(cfg, **kw):
    return bn_mnist.run(cfg, **kw)


def test_run_writes_config_metrics_figure_and_plot_redraws(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    summary = run_quietly(bn_mnist.Config(out=str(out), workers=1, **FAST))
    printed = capsys.readouterr().out
    assert "scikit-learn's bundled 8x8 digits" in printed and "figure:" in printed
    record = json.loads((out / "config.json").read_text())
    assert record["seed"] == 0 and record["config"]["steps"] == 300 and "bnlab" in record["code_version"]
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("baseline", "bn"):
        rows = metrics["nets"][name]
        assert [r["step"] for r in rows] == [0, 100, 200, 300]
        assert all(r["p15"] <= r["p50"] <= r["p85"] for r in rows)
    assert metrics["summary"] == summary
    assert summary["accuracy"]["bn"]["300"] > 0.5  # ten classes: chance is 0.1
    assert 0 < summary["bn_population_statistics_accuracy"] <= 1
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 2 * 4
    figure = out / "figure.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert cli.main(["plot", str(out)]) == 0 and figure.exists()


def test_two_processes_give_the_same_result_as_one(tmp_path, no_mnist):
    one = run_quietly(bn_mnist.Config(out=str(tmp_path / "one"), workers=1, **FAST))
    two = run_quietly(bn_mnist.Config(out=str(tmp_path / "two"), workers=2, **FAST))
    assert one == two
    for name in ("baseline", "bn"):
        a = json.loads((tmp_path / "one" / "metrics.json").read_text())["nets"][name]
        b = json.loads((tmp_path / "two" / "metrics.json").read_text())["nets"][name]
        assert a == b


def test_drift_is_the_mean_range_after_settling():
    rows = [{"step": s, "p15": -s, "p50": 0.0, "p85": 2 * s} for s in range(0, 101, 10)]
    # From step 10 on: p15 ranges 90, p50 0, p85 180.
    assert bn_mnist.drift(rows) == pytest.approx((90 + 0 + 180) / 3)


def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_DATA"}
    env["HOME"] = str(tmp_path / "home")  # no MNIST cache there: the embedded digits
    return env


def bnlab_cmd(*args):
    return [sys.executable, "-m", "bnlab.cli", "reproduce", "bn-mnist", *args]


LONG = ["--steps", "6000", "--eval-every", "500", "--checkpoint-every", "500", "--recalibration-batches", "20",
        "--probe-examples", "200", "--workers", "1"]


def test_resume_after_kill_9_reaches_the_same_final_metrics(tmp_path):
    env = cli_env(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(bnlab_cmd(*LONG, "--out", str(full)), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(bnlab_cmd(*LONG, "--out", str(cut)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = cut / "baseline" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists() and not (cut / "metrics.json").exists()  # killed mid-run
    result = subprocess.run(bnlab_cmd("--resume", str(cut)), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    expected = json.loads((full / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed == expected


def test_existing_run_is_never_overwritten_and_corrupt_checkpoints_are_named(tmp_path, no_mnist, capsys):
    out = tmp_path / "run"
    cfg = bn_mnist.Config(out=str(out), workers=1, **FAST)
    run_quietly(cfg)
    checkpoint = out / "bn" / "checkpoint.safetensors"
    before = checkpoint.read_bytes()
    args = ["reproduce", "bn-mnist", "--out", str(out), "--steps", "300", "--workers", "1"]
    assert cli.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert checkpoint.read_bytes() == before
    checkpoint.write_bytes(before[: len(before) // 2])
    assert cli.main(["reproduce", "bn-mnist", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.safetensors" in err and "corrupt" in err
    assert checkpoint.read_bytes() == before[: len(before) // 2]


def test_every_config_field_is_a_flag():
    parser = cli.build_parser()
    args = parser.parse_args(["reproduce", "bn-mnist", "--init-std", "0.05", "--lr", "0.2", "--quick", "--seed", "3"])
    cfg = cli._config(bn_mnist, args)
    assert (cfg.init_std, cfg.lr, cfg.seed, cfg.steps) == (0.05, 0.2, 3, 3000)
    for field in dataclasses.fields(bn_mnist.Config):
        assert "--" + field.name.replace("_", "-") in parser._subparsers._group_actions[0].choices[
            "reproduce"]._subparsers._group_actions[0].choices["bn-mnist"].format_help()


def test_on_real_mnist_bn_learns_faster(tmp_path, mnist_dir):
    cfg = dataclasses.replace(bn_mnist.Config().quick(), out=str(tmp_path / "run"), data_dir=str(mnist_dir),
                              steps=2000, eval_every=500)
    summary = run_quietly(cfg)
    acc = summary["accuracy"]
    assert acc["bn"]["2000"] > acc["baseline"]["2000"] + 0.05
    assert acc["bn"]["2000"] > 0.9
