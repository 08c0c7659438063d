"""gradcheck and gradgradcheck in float64 for bnlab's hand-written backward, train and eval."""

import copy

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


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("affine", [True, False])
def test_gradgradcheck_fused_bn_act(act, affine):
    """The kernels' backward has no graph; under create_graph=True the gradient is autograd's
    through the same forward in torch ops, so a gradient penalty or MAML through the layer works."""
    from bnlab.autograd import BatchNormActFunction

    x, w, b = inputs((3, 2, 3, 2), affine, seed=6)

    def f(x, *wb):
        return BatchNormActFunction.apply(x, *(wb or (None, None)), 1e-5, act, 0.1)[0]

    assert torch.autograd.gradgradcheck(f, (x, w, b) if affine else (x,))


def test_a_gradient_penalty_through_the_fused_kernels_is_torchs():
    """A gradient penalty through a conv and the fused BN + ReLU, with a constant gradient reaching
    the layer (torch's once_differentiable then returned no graph, and the penalty's gradient came
    out as the conv's part alone: silently wrong): the same gradients as torch's BN and ReLU."""
    import bnlab

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64)
    ours = torch.nn.Sequential(conv, bnlab.BatchNormAct2d(3, backend="fused", dtype=torch.float64))
    theirs = torch.nn.Sequential(copy.deepcopy(conv), torch.nn.BatchNorm2d(3, dtype=torch.float64), torch.nn.ReLU())
    u = torch.randn(4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for model in (ours, theirs):
        (g,) = torch.autograd.grad((model(u) * c).sum(), u, create_graph=True)
        g.square().sum().backward()
    torch.testing.assert_close(ours[0].weight.grad, theirs[0].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[0].bias.grad, theirs[0].bias.grad, rtol=1e-10, atol=1e-12)
    assert ours[0].weight.grad.abs().max() > 1e-3  # (the penalty depends on the conv's weight)
