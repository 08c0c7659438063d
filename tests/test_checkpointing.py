"""Activation checkpointing (torch.utils.checkpoint) recomputes a segment's forward in the backward:
every bnlab layer must then give the output of the forward being recomputed and change no state,
so a checkpointed model trains exactly as the plain one (torch's BN folds each batch in twice)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlab

STEPS = 6


def cbn(compensate=True, backend="auto", burn_in=2):
    def make():
        net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6),
                            nn.BatchNorm1d(6))
        net = bnlab.cross_iteration(net, window=3, burn_in=burn_in, compensate=compensate)
        for layer in (net[1], net[5]):
            layer.backend = backend
        return net
    return make


def pair(norm2d, norm1d):
    return lambda: nn.Sequential(nn.Conv2d(2, 4, 3), norm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6),
                                 norm1d(6))


RENORM = {"warmup": 1, "r_max_steps": 4, "d_max_steps": 4, "momentum": 0.3}  # r and d away from (1, 0) at once
MODELS = {
    "bn": pair(bnlab.BatchNorm2d, bnlab.BatchNorm1d),
    "bn-cumulative": pair(lambda c: bnlab.BatchNorm2d(c, momentum=None), lambda c: bnlab.BatchNorm1d(c, momentum=None)),
    "bn-act (fused kernels)": pair(lambda c: bnlab.BatchNormAct2d(c, backend="fused"), bnlab.BatchNormAct1d),
    "ghost": pair(lambda c: bnlab.GhostBatchNorm2d(c, virtual_batch_size=2),
                  lambda c: bnlab.GhostBatchNorm1d(c, virtual_batch_size=2)),
    "sync (no process group)": pair(bnlab.SyncBatchNorm, bnlab.SyncBatchNorm),
    "batch renorm": pair(lambda c: bnlab.BatchRenorm2d(c, **RENORM), lambda c: bnlab.BatchRenorm1d(c, **RENORM)),
    "cbn": cbn(),
    "cbn naive": cbn(compensate=False),
    "cbn on torch ops": cbn(backend="native"),
    "cbn, a burn-in that stores nothing at first": cbn(burn_in=4),  # (steps 0-1 plain BN, 2-3 store, 4- pool)
}


class Checkpointed(nn.Module):
    def __init__(self, net, reentrant):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        return checkpoint(self.net, x, use_reentrant=self.reentrant)


class Twice(nn.Module):
    """The network called twice on each batch (weights shared, as in a siamese pair)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 2 + self.net(x)


def train(net, batches, projections):
    opt = torch.optim.SGD(net.parameters(), lr=0.2)
    for x, w in zip(batches, projections):
        opt.zero_grad()
        (net(x) * w).sum().backward()  # (a random projection: BN's sum of squares has no gradient)
        opt.step()


def batches(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 2, 8, 8, generator=g, dtype=dtype).requires_grad_() for _ in range(STEPS)]
    return xs, [torch.randn(4, 6, generator=g, dtype=dtype) for _ in range(STEPS)]


def assert_same_state(plain, checkpointed, tol):
    """Every tensor of the state within ``tol`` of its largest value (the counts exactly)."""
    for (name, ours), theirs in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        if not ours.is_floating_point():
            assert torch.equal(theirs, ours), name
        elif ours.numel():
            assert (theirs - ours).abs().max() <= tol * ours.abs().max(), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_checkpointed_model_trains_as_the_plain_one(kind, reentrant, dtype):
    torch.manual_seed(0)
    plain = MODELS[kind]().to(dtype)
    twin = copy.deepcopy(plain)
    xs, ws = batches(dtype)
    train(plain, xs, ws)
    train(Checkpointed(twin, reentrant), xs, ws)
    for layer in (twin[1], twin[5]):  # each batch counted once, not once more for the recomputation
        counts = layer.iteration if isinstance(layer, bnlab.CrossIterationBatchNorm) else layer.num_batches_tracked
        assert int(counts) == STEPS
    # (the fused kernels' forward is replayed from its statistics by torch ops: rounding apart, which
    # six steps at batch 4 grow to about 1e-5 in float32)
    assert_same_state(plain, twin, 1e-11 if dtype == torch.float64 else 1e-4)


def test_two_checkpointed_forwards_before_one_backward():
    """Two micro-batches in one graph: each recomputation finds its own forward's window."""
    torch.manual_seed(0)
    plain = cbn()().double()
    twin = copy.deepcopy(plain)
    xs, ws = batches(torch.float64)
    for net, wrap in ((plain, lambda x: plain(x)), (twin, lambda x: checkpoint(twin, x, use_reentrant=False))):
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        for step in range(0, STEPS, 2):
            opt.zero_grad()
            ((wrap(xs[step]) * ws[step]).sum() + (wrap(xs[step + 1]) * ws[step + 1]).sum()).backward()
            opt.step()
    assert int(twin[1].iteration) == STEPS
    assert_same_state(plain, twin, 1e-11)


def test_a_retained_graph_recomputes_the_same_forward_twice():
    torch.manual_seed(0)
    net = cbn()().double()
    xs, ws = batches(torch.float64)
    for x in xs[:3]:  # past the burn-in: the window pools
        net(x)
    loss = (checkpoint(net, xs[3], use_reentrant=False) * ws[3]).sum()
    first = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(net.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["batch renorm", "cbn"])
def test_identical_batches_train_as_the_plain_model_when_the_calls_can_be_told_apart(kind, reentrant):
    """The same batch at every step (overfitting one batch): each step's recomputation is of that
    step's forward, the latest on the batch, although earlier records match it too."""
    torch.manual_seed(0)
    plain = MODELS[kind]().double()
    twin = copy.deepcopy(plain)
    xs, ws = batches(torch.float64)
    train(plain, [xs[0]] * STEPS, ws)
    train(Checkpointed(twin, reentrant), [xs[0]] * STEPS, ws)
    assert_same_state(plain, twin, 1e-11)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("segments", ["one segment", "two segments"])
@pytest.mark.parametrize("kind", ["batch renorm", "cbn"])
def test_a_layer_called_twice_on_identical_batches_before_one_backward_is_refused(kind, segments, reentrant):
    """Two calls on identical batches, each changing the state the other's output depends on, in
    checkpointed segments: the records cannot say which call is recomputed (one segment repeats
    them in forward order, two segments in backward order), and returning the latest for both
    gave wrong gradients silently. Now the second recomputation raises."""
    torch.manual_seed(0)
    net = MODELS[kind]().double()
    xs, ws = batches(torch.float64)
    for x in xs[:3]:  # (CBN past its burn-in: the window pools)
        net(x)
    if segments == "one segment":
        y = checkpoint(Twice(net), xs[3], use_reentrant=reentrant)
    else:
        y = checkpoint(net, xs[3], use_reentrant=reentrant) * 2 + checkpoint(net, xs[3], use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="second call on an identical batch.*Keep the layer outside the "
                                           "checkpointed segments"):
        (y * ws[3]).sum().backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kind", ["batch renorm", "cbn"])
def test_two_calls_on_identical_batches_whose_states_agree_are_recomputed(kind, reentrant):
    """Cross-iteration BN in its burn-in is BN (the last window - 1 iterations store, but pool
    nothing), and Batch Renorm in its warm-up too (r = 1, d = 0): the output does not depend on
    the state either call changed, so two calls on identical batches in a checkpointed segment are
    no ambiguity, and train as without checkpointing."""
    torch.manual_seed(0)
    if kind == "cbn":
        plain = cbn(burn_in=4)().double()  # (window 3: iterations 0-1 plain BN, 2-3 store; two calls a step)
    else:
        plain = pair(*(lambda c, cls=cls: cls(c, **{**RENORM, "warmup": 4}) for cls in
                       (bnlab.BatchRenorm2d, bnlab.BatchRenorm1d)))().double()
    twin = copy.deepcopy(plain)
    xs, ws = batches(torch.float64)
    train(Twice(plain), xs[:2], ws)
    train(Checkpointed(Twice(twin), reentrant), xs[:2], ws)
    counts = twin[1].iteration if kind == "cbn" else twin[1].num_batches_tracked
    assert int(counts) == 4
    assert_same_state(plain, twin, 1e-11)


def test_a_recomputation_of_an_unseen_batch_is_refused():
    """Only a forward the layer recorded can be repeated: its output depends on the window."""
    torch.manual_seed(0)
    net = cbn()().double()
    net(torch.randn(4, 2, 8, 8, dtype=torch.float64))
    other = torch.randn(4, 2, 8, 8, dtype=torch.float64)

    class RunsTheNetInItsBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            net(other)
            return g

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="recomputed inside a backward pass.*checkpoint"):
        RunsTheNetInItsBackward.apply(x).sum().backward()


@pytest.mark.parametrize("kind", ["batch renorm", "cbn", "cbn on torch ops"])
def test_a_constant_channel_is_recomputed_too(kind):
    """A dead channel (all zeros at the first step: variance 0, which BN's kernel gives back as
    1/sqrt(0 + eps), so the recorded variance is a rounding error, not 0) still finds its
    forward's record. (It was refused as a batch the layer never normalized.)"""
    torch.manual_seed(0)
    plain = MODELS[kind]()
    with torch.no_grad():
        plain[0].weight[0] = 0.0
        plain[0].bias[0] = 0.0
    twin = copy.deepcopy(plain)
    xs, ws = batches(torch.float32)
    train(plain, xs, ws)
    train(Checkpointed(twin, reentrant=False), xs, ws)
    assert_same_state(plain, twin, 1e-4)


def test_the_fused_layer_keeps_its_input_only_as_a_saved_tensor():
    """The checkpoint frees a segment's saved tensors until the backward recomputes them. A NumPy
    view of the input kept beside them in the fused function's context held the memory all the
    same (the view's base is a second torch alias of the storage)."""
    conv = nn.Conv2d(2, 4, 3)
    layer = bnlab.CrossIterationBatchNorm2d(4, window=3).pair(conv)
    x = conv(torch.randn(4, 2, 8, 8))
    y = layer(x)
    assert type(y.grad_fn).__name__.startswith("FusedCrossIterationNormFunction")
    assert not any(isinstance(a, np.ndarray) and np.shares_memory(a, x.detach().numpy()) for a in y.grad_fn.arrays)
    y.sum().backward()  # (the backward takes its view from the saved tensor)
    assert torch.isfinite(conv.weight.grad).all()
