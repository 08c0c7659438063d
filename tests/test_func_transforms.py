"""bnlab's layers under torch.func's transforms (grad, vmap, jvp) and forward-mode AD, as torch's BN.

MAML-style code takes gradients with ``torch.func.grad`` of a ``functional_call``, ensembles run
a model under ``vmap``, and ``jvp`` is forward-mode AD. bnlab's kernels (numba, Triton) sit in
autograd functions those transforms cannot see through: before, every layer on them (BN with an
activation on a large CPU input, by default; cross-iteration BN; SyncBatchNorm without a group)
failed with torch's "must override the setup_context staticmethod". Under a transform the layers
now take torch's kernels and differentiable torch ops; a kernel backend named explicitly refuses
with the reason. A batched gradient (``is_grads_batched=True``, torch's own vmap over the
backward) reached the kernels' backward, which takes one gradient: it now goes through torch's ops.
"""

import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

import bnlab
from bnlab import distributed
from conftest import conv_net

# (torch's forward-mode AD loads its decompositions through torch.jit.script, which 2.13 deprecates)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


# (name, the model, its input's shape); BatchNormAct2d(64) on 8x64x16x16 is the fused kernels' input
LAYERS = {
    "bn": (lambda: conv_net(bnlab.BatchNorm2d(8), 8), (8, 3, 6, 6)),
    "bn-act on the fused kernels' input": (lambda: conv_net(bnlab.BatchNormAct2d(64), 64), (8, 3, 16, 16)),
    "ghost": (lambda: conv_net(bnlab.GhostBatchNorm2d(8, virtual_batch_size=4), 8), (8, 3, 6, 6)),
    "batch-renorm": (lambda: conv_net(bnlab.BatchRenorm2d(8, warmup=0, r_max_steps=1, d_max_steps=1), 8),
                     (8, 3, 6, 6)),
    "sync, no process group": (lambda: conv_net(bnlab.SyncBatchNorm(8), 8), (8, 3, 6, 6)),
    "cross-iteration": (lambda: bnlab.cross_iteration(conv_net(nn.BatchNorm2d(8), 8), window=3), (4, 3, 6, 6)),
}


def trained_pair(name):
    """Two copies of a model after three SGD steps (running statistics moved, CBN's window full)."""
    make, shape = LAYERS[name]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(shape, generator=generator) * 2 + 1 for _ in range(4)]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for x in batches[:3]:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        optimizer.zero_grad()
        models.append(model)
    return *models, batches[3]


def loss(y: torch.Tensor) -> torch.Tensor:
    return y.square().mean() + (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()


@pytest.mark.parametrize("name", LAYERS)
def test_grad_of_a_functional_call_is_the_eager_backward(name):
    """torch.func.grad of the loss of a functional_call (parameters and buffers passed in) gives the
    eager step's gradients, and the buffers passed in end as the eager model's (running
    statistics, CBN's window), float64."""
    eager, functional, x = trained_pair(name)
    eager.double(), functional.double()
    x = x.double()
    loss(eager(x)).backward()
    params = {key: p.detach() for key, p in functional.named_parameters()}
    buffers = {key: b.clone() for key, b in functional.named_buffers()}
    grads = torch.func.grad(lambda p, b: loss(functional_call(functional, (p, b), (x,))))(params, buffers)
    for key, p in eager.named_parameters():
        torch.testing.assert_close(grads[key], p.grad, msg=lambda m: f"{key}: {m}")
    for key, b in eager.named_buffers():
        torch.testing.assert_close(buffers[key], b, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", LAYERS)
def test_forward_mode_ad_in_training_is_the_double_backward_jvp(name):
    """Forward-mode AD of the training output (the dual-tensor API) equals the Jacobian-vector
    product that torch.autograd.functional.jvp takes by two reverse passes (through the layers' own
    backward with create_graph=True), float64, from the same state. (torch.func.jvp would need the
    buffers, the batch count included, as primals: an integer buffer cannot be one, and a
    captured one cannot change, for torch's BN as for these.)"""
    model, _, x = trained_pair(name)
    model.double()
    x, tangent = x.double(), torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    state = copy.deepcopy(model.state_dict())  # (each call from the same state: Batch Renorm's r and d, CBN's window)
    reverse = torch.autograd.functional.jvp(model, x, tangent)[1]
    model.load_state_dict(state)
    with forward_ad.dual_level():
        dual = forward_ad.unpack_dual(model(forward_ad.make_dual(x, tangent))).tangent
    torch.testing.assert_close(dual, reverse)


@pytest.mark.parametrize("name", LAYERS)
def test_vmap_over_stacked_batches_in_eval_mode_is_the_loop(name):
    """A model in eval mode under vmap over a stack of batches gives each batch's output."""
    model, _, x = trained_pair(name)
    model.eval()
    stacked = torch.stack([x, x.flip(0) * 0.5])
    torch.testing.assert_close(torch.func.vmap(model)(stacked), torch.stack([model(b) for b in stacked]))


@pytest.mark.parametrize("act", ["relu", "identity"])
def test_vmap_in_training_without_running_statistics_normalizes_each_batch(act):
    """Model ensembles: BN without running statistics (track_running_stats=False, as torch.func's
    replace_all_batch_norm_modules_ makes it) under vmap normalizes each stacked batch by its own
    statistics, on an input the fused kernels take outside vmap."""
    layer = bnlab.BatchNormAct2d(64, act=act, track_running_stats=False)
    stacked = torch.randn(3, 8, 64, 16, 16) * 2 + 1
    torch.testing.assert_close(torch.func.vmap(layer)(stacked), torch.stack([layer(b) for b in stacked]))


@pytest.mark.parametrize("backend", ["fused", "autograd"])
def test_a_kernel_backend_named_under_a_transform_says_why_it_cannot_run(backend):
    layer = bnlab.BatchNorm2d(8, backend=backend)
    x = torch.randn(4, 8, 5, 5)
    with pytest.raises(ValueError, match=f"backend='{backend}' runs bnlab's own kernels.*backend='auto'"):
        torch.func.grad(lambda t: layer(t).square().sum())(x)
    with forward_ad.dual_level(), pytest.raises(ValueError, match="forward-mode AD"):
        layer(forward_ad.make_dual(x, torch.ones_like(x)))
    layer(x).sum().backward()  # (outside a transform, as before)


def test_synchronized_bn_over_ranks_under_a_transform_refuses(monkeypatch):
    """Over several ranks the statistics need collectives, inside an autograd function torch.func
    cannot see through: refused with the reason, before any collective."""
    monkeypatch.setattr(distributed, "_world", lambda group: 2)
    layer = bnlab.SyncBatchNorm(8)
    with pytest.raises(ValueError, match="over 2 ranks cannot run under torch.func's transforms"):
        torch.func.grad(lambda t: layer(t).square().sum())(torch.randn(4, 8, 5, 5))


def test_synchronized_bn_under_a_transform_refuses_one_value_per_channel():
    layer = bnlab.SyncBatchNorm(8)
    with pytest.raises(ValueError, match="1 value"):
        torch.func.grad(lambda t: layer(t).square().sum())(torch.randn(1, 8))


@pytest.mark.parametrize("name", LAYERS)
def test_batched_gradients_are_each_gradient(name):
    """autograd.grad(..., is_grads_batched=True) (torch's own vmap over the backward, which
    jacobian(vectorize=True) runs) gives each gradient of the loop, float64: the kernels'
    backward takes one gradient at a time, so a batched one goes through torch's ops."""
    model, _, x = trained_pair(name)
    model.double()
    x = x.double().requires_grad_()
    y = model(x)
    vectors = torch.randn(3, *y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    batched = torch.autograd.grad(y, x, vectors, is_grads_batched=True, retain_graph=True)[0]
    each = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in vectors])
    torch.testing.assert_close(batched, each)
