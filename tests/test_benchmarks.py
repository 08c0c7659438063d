"""The benchmark that RESULTS.md quotes for CBN still runs and prints what the README reads."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_bench_cbn():
    spec = importlib.util.spec_from_file_location("bench_cbn", ROOT / "benchmarks" / "bench_cbn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cbn_runs_and_reports_ratios_and_parts():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cbn.py"), "--steps", "60", "--parts",
                          "--variants", "--moments", "--fixed-cost"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    ratios = re.search(r"ratio CBN/BN ([\d.]+), CBN/torch's BN ([\d.]+)", out)
    assert ratios and all(float(r) > 0 for r in ratios.groups()), out
    parts = dict(re.findall(r"^\s+(\S.*?)\s+([\d.]+) ms$", out, flags=re.M))
    assert float(parts["d nu/dW of conv2 and conv3, in the producers' hooks (torch's weight-gradient kernel)"]) > 0, out
    assert float(parts["derivatives into the window (store_conv[_moments], store_linear)"]) > 0, out
    # conv1 (1 -> 16 channels, fan-in 9) takes d nu/dW from its patches' second moments, the others on torch's kernel
    stores = set(re.findall(r"^\s+(store_\w+)\s+\((.*?)\)\s+in the steps", out, flags=re.M))
    assert stores == {("store_conv_moments", "4, 1, 28, 28"), ("store_conv", "4, 16, 14, 14"),
                      ("store_conv", "4, 32, 7, 7"), ("store_linear", "4, 128")}, out
    compared = re.findall(r"weight gradient\s+([\d.]+) us, second moments\s+([\d.]+) us", out)
    assert len(compared) == len(load_bench_cbn().MOMENT_SHAPES) and all(float(a) > 0 for pair in compared for a in pair)
    # each kernel, per layer, inside the steps and alone: the four layers' pooled_backward
    per_layer = re.findall(r"^\s+pooled_backward\s+\((.*?)\)\s+in the steps\s+([\d.]+) us, alone\s+([\d.]+) us$", out,
                           flags=re.M)
    assert {shape for shape, *_ in per_layer} == {"4, 128, 1", "4, 64, 49", "4, 32, 196", "4, 16, 784"}, out
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in per_layer), out
    variants = dict(re.findall(r"^  (CBN.*?): [\d.]+ ms, ([\d.]+)x BN$", out, flags=re.M))
    assert set(variants) == set(load_bench_cbn().VARIANTS) and all(float(r) > 0 for r in variants.values()), out
    # each layer's cost is a difference of two timed steps (no sign asserted: tests assert no timing);
    # the extra it prints is the difference of the figures it prints
    fixed = re.search(r"torch's BN (-?[\d.]+) us, bnlab's BN (-?[\d.]+) us, CBN (-?[\d.]+) us; CBN (-?[\d.]+) us more",
                      out)
    assert fixed, out
    assert abs(float(fixed[3]) - float(fixed[2]) - float(fixed[4])) < 0.15, out


def test_official_style_derivatives_equal_the_layers():
    """The benchmark's two-autograd-pass derivatives (the official code's way) are the same numbers
    as the layer's mean patches and weight-gradient reduction: the variants time the same method."""
    bench = load_bench_cbn()
    torch.manual_seed(0)
    ours, official = bench.cbn_variant(None, "native"), bench.cbn_variant(bench.AutogradDerivatives, "native")
    official.load_state_dict(ours.state_dict())
    x, y = torch.rand(3, 4, 1, 28, 28), torch.randint(0, 10, (3, 4))
    for net in (ours, official):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for s in range(3):
            loss = torch.nn.functional.cross_entropy(net(x[s]), y[s])
            opt.zero_grad()
            loss.backward()
            opt.step()
    theirs = official.state_dict()
    checked = 0
    for name, value in ours.state_dict().items():
        if "window_d" in name:
            assert value.abs().max() > 0, name  # (filled: three steps stored three entries)
            torch.testing.assert_close(theirs[name], value, rtol=1e-4, atol=1e-6 * value.abs().max().item())
            checked += 1
    assert checked == 16  # four layers: d mu/dW, d nu/dW and their products with the weights


def test_cbn_drift_diagnostic_measures_mean_shifts_in_standard_deviations():
    """benchmarks/cbn_weight_norms.py, which the README quotes: a producer whose output moves by a
    known amount drifts by that amount, in units of its standard deviation; the script runs."""
    spec = importlib.util.spec_from_file_location("cbn_weight_norms", ROOT / "benchmarks" / "cbn_weight_norms.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    from bnlab.experiments.small_batch import Config, SmallConvNet

    torch.manual_seed(0)
    net = SmallConvNet("bn", steps=10, cfg=Config(), classes=10)
    probe = torch.rand(16, 1, 28, 28)
    before = diag.producer_moments(net, probe)
    assert net.training  # (measured in inference mode, the model's mode kept)
    with torch.no_grad():
        net.fc.weight[:, :] = 0.0  # fc's output: every channel's mean to 0
    after = diag.producer_moments(net, probe)
    moved = diag.drift(before, after)
    assert moved[:3] == [0.0, 0.0, 0.0]
    mean, sd = before[3]
    assert abs(moved[3] - float((mean.abs() / sd).median())) < 1e-6 and moved[3] > 0.1
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cbn_weight_norms.py"), "--examples", "80",
                          "--batch", "4", "--every", "10", "--burn-in", "0.5", "--lr-drop", "0.1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "burn-in to step 10" in out and out.count("test accuracy") == 2, out


@pytest.mark.parametrize("extra", [[], ["--eval"], ["--eval", "--backend", "triton"]])
def test_bench_bn_act_runs_in_training_and_inference(extra):
    """The BN + activation benchmark on small shapes (the Triton kernels under Triton's interpreter)."""
    if "triton" in extra:
        pytest.importorskip("triton", reason="Triton is not installed (pip install bnlab[triton])")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bn_act.py"), "--shapes", "6x4x5x5,8x6",
                          "--repeats", "2", *extra], capture_output=True, text=True, timeout=300, check=True,
                         env=env).stdout
    assert ("inference" if "--eval" in extra else "training") in out.splitlines()[0], out
    rows = re.findall(r"^\s+\((.*?)\)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x", out, flags=re.M)
    assert [row[0] for row in rows] == ["6, 4, 5, 5", "8, 6"], out  # (times printed rounded: no value asserted)


def test_bench_fuse_runs_and_the_fused_network_gives_the_same_outputs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fuse.py"), "--batches", "1,3",
                          "--repeats", "40"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = re.findall(r"^batch (\d+): bnlab, eval [\d.]+ us \(1.00x\), bnlab.fuse [\d.]+ us \(([\d.]+)x\), "
                      r"torch.nn BN, eval [\d.]+ us \(([\d.]+)x\), torch fx fuse [\d.]+ us \(([\d.]+)x\); "
                      r"fused output differs by ([\d.e+-]+) at most$", out, flags=re.M)
    assert [row[0] for row in rows] == ["1", "3"], out
    assert all(float(r) > 0 for row in rows for r in row[1:4]), out
    assert all(float(row[4]) < 1e-4 for row in rows), out  # (float32 logits of order 1)
