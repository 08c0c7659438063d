"""Models with bnlab's layers train under torch.compile and match eager training step by step.

The layers built on numba kernels (the fused BN + activation, cross-iteration BN) and Batch Renorm
(whose moving statistics change in place after the graph used them) run eagerly inside a compiled
model (graph breaks); before, dynamo failed inside numba's dispatcher and Batch Renorm's backward
failed autograd's version check. The "aot_eager" backend exercises dynamo and AOTAutograd (where
both failures were) without inductor's slow code generation.
"""

import pytest
import torch
from torch import nn

import bnlab


def conv_net(norm: nn.Module, channels: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), norm, nn.ReLU())


CASES = {
    "bn": lambda: conv_net(bnlab.BatchNorm2d(8)),
    "bn-act-fused": lambda: conv_net(bnlab.BatchNormAct2d(64), 64),  # (8x64x32x32: the numba kernels)
    "batch-renorm": lambda: conv_net(bnlab.BatchRenorm2d(8, warmup=0, r_max_steps=1, d_max_steps=1)),
    "ghost": lambda: conv_net(bnlab.GhostBatchNorm2d(8, virtual_batch_size=2)),
    "cross-iteration": lambda: bnlab.cross_iteration(conv_net(nn.BatchNorm2d(8)), window=3),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_training_matches_eager(name):
    torch.manual_seed(0)
    eager, compiled = CASES[name](), CASES[name]()
    compiled.load_state_dict(eager.state_dict())
    if name == "cross-iteration":  # (pair() is not state: the copy pairs with its own convs)
        assert compiled[1].producer is compiled[0]
    step = torch.compile(compiled, backend="aot_eager")
    for _ in range(4):
        x = torch.randn(8, 3, 32, 32)
        y_eager, y_compiled = eager(x), step(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        y_eager.square().mean().backward()
        y_compiled.square().mean().backward()
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-6)
    for key, value in eager.state_dict().items():  # running statistics, CBN's window, counters
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
