"""The README's Python example runs as printed and does what its comments say."""

import re
from pathlib import Path

import torch

import bnlab

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 (our own README)
    net, cnn = scope["net"], scope["cnn"]
    assert not net.training and int(net[1].num_batches_tracked) > 0
    assert isinstance(cnn[1], bnlab.BatchNorm2d) and isinstance(cnn[0], torch.nn.Conv2d)
    fused, x = scope["fused"], torch.randn(3, 784)
    assert isinstance(fused[1], torch.nn.Identity) and isinstance(net[1], bnlab.BatchNorm1d)
    torch.testing.assert_close(fused(x), net(x))
    shipped = scope["shipped"]
    assert type(shipped[1]) is torch.nn.BatchNorm1d and not shipped.training
    torch.testing.assert_close(shipped(x), net(x))
