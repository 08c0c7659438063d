"""The benchmark that RESULTS.md quotes for CBN still runs and prints what the README reads."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cbn_runs_and_reports_ratios_and_parts():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_cbn.py"), "--steps", "60", "--parts"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    ratios = re.search(r"ratio CBN/BN ([\d.]+), CBN/torch's BN ([\d.]+)", out)
    assert ratios and all(float(r) > 0 for r in ratios.groups()), out
    parts = dict(re.findall(r"^\s+(\S.*?)\s+([\d.]+) ms$", out, flags=re.M))
    assert float(parts["d nu/dW of the convs, in the producers' hooks (torch's weight-gradient kernel)"]) > 0, out
    assert "store_linear" in out
    # each kernel, per layer, inside the steps and alone: the four layers' pooled_backward
    per_layer = re.findall(r"^\s+pooled_backward\s+\((.*?)\)\s+in the steps\s+([\d.]+) us, alone\s+([\d.]+) us$", out,
                           flags=re.M)
    assert {shape for shape, *_ in per_layer} == {"4, 128, 1", "4, 64, 49", "4, 32, 196", "4, 16, 784"}, out
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in per_layer), out
