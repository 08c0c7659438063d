"""gradcheck and gradgradcheck in float64 for bnlab's hand-written backward, train and eval."""

import pytest
import torch

from bnlab import functional as F
from bnlab.autograd import BatchNormFunction


def inputs(shape, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    if not affine:
        return x, None, None
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 3, 2)])
def test_gradcheck_and_gradgradcheck_training(affine, shape):
    x, w, b = inputs(shape, affine)

    def f(*args):
        return BatchNormFunction.apply(args[0], *(args[1:] or (None, None)), 1e-5)[0]

    args = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("backend", ["native", "autograd"])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_inference(backend, affine):
    x, w, b = inputs((4, 3, 2, 2), affine)
    rm = torch.randn(3, dtype=torch.float64)
    rv = torch.rand(3, dtype=torch.float64) + 0.5

    def f(*args):
        return F.batch_norm(args[0], rm, rv, *(args[1:] or (None, None)), training=False, backend=backend)

    args = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_statistics_outputs_are_not_differentiable():
    x, w, b = inputs((5, 2), True)
    _, mean, var = BatchNormFunction.apply(x, w, b, 1e-5)
    assert not mean.requires_grad and not var.requires_grad


ACTS = ["identity", "relu", "leaky_relu", "silu", "sigmoid"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "ncl"])
def test_gradcheck_fused_bn_act(act, layout):
    from bnlab.autograd import BatchNormActFunction

    shape = {"nchw": (3, 2, 3, 2), "channels_last": (3, 2, 3, 2), "rows": (7, 3), "ncl": (3, 2, 4)}[layout]
    x, w, b = inputs(shape, True, seed=5)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()

    def f(x, w, b):
        return BatchNormActFunction.apply(x, w, b, 1e-5, act, 0.1)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
