"""Cross-Iteration BN (Yao et al. 2020): derivatives, compensation, equivalences, resume, conversion."""

import copy
import functools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save
from torch import nn
from torch.nn.utils import prune

import bnlab
from bnlab import functional as F
from bnlab import reference as R

PRODUCERS = {
    "linear": lambda: nn.Linear(5, 4),
    "conv": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    "conv-nobias": lambda: nn.Conv2d(3, 4, 2, bias=False, dilation=2),
    # padded by the layer itself as torch's Conv2d pads them (F.conv_input); "same" is uneven for 2
    "conv-reflect": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=(1, 2), padding_mode="reflect"),
    "conv-same": lambda: nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(2, 1), bias=False),
    # fan-in at most the outputs: d nu/dW from the patches' second moments on the numba kernels
    "conv-moments": lambda: nn.Conv2d(1, 12, 3, stride=(2, 1), padding=(1, 2)),
    "conv-moments-replicate": lambda: nn.Conv2d(2, 20, 3, padding=1, dilation=(1, 2), padding_mode="replicate",
                                                bias=False),
}


def inputs(kind, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (batch, 5), "conv": (batch, 4, 7, 7), "conv-moments": (batch, 1, 7, 6),
             "conv-moments-replicate": (batch, 2, 6, 7)}.get(kind, (batch, 3, 6, 6))
    return torch.randn(shape, generator=g, dtype=torch.float64) + 0.5


# "auto" takes the numba kernels on CPU float tensors (bnlab.kernels.cpu_cbn), "native" torch's ops.
PATHS = ("auto", "native")


def pair(kind, window, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    producer = PRODUCERS[kind]().to(dtype)
    cls = bnlab.CrossIterationBatchNorm1d if kind == "linear" else bnlab.CrossIterationBatchNorm2d
    layer = cls(producer.weight.shape[0], window=window, dtype=dtype, **kw).pair(producer)
    return producer, layer


@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_weight_derivatives_equal_autograd(kind):
    producer, _ = pair(kind, 2)
    u = inputs(kind)
    x = producer(u)
    mu, nu, dmu, dnu = F.producer_statistics(x, u, producer)
    # Channel j depends on row j only, so d(sum_j stat_j)/dW has d stat_j / d W_j in row j.
    torch.testing.assert_close(dmu, torch.autograd.grad(mu.sum(), producer.weight, retain_graph=True)[0])
    torch.testing.assert_close(dnu, torch.autograd.grad(nu.sum(), producer.weight)[0])


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_window_1_is_bn(kind, backend):
    producer, cbn = pair(kind, 1, backend=backend)
    bn = (bnlab.BatchNorm1d if kind == "linear" else bnlab.BatchNorm2d)(cbn.num_features, dtype=torch.float64)
    for step in range(3):
        u = inputs(kind, seed=step)
        xa = producer(u).detach().requires_grad_()
        xb = xa.detach().clone().requires_grad_()
        producer_out = producer(u)  # the hook sees the producer's input
        del producer_out
        ya, yb = cbn(xa), bn(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
        dy = torch.randn_like(ya)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cbn.running_var, bn.running_var)


def run(producer, layer, steps, lr=0.0, seed=0, history=None):
    """Train the pair on fixed batches with plain SGD on the producer; returns each step's output.

    ``history`` (a list) receives each step's (mu, nu, dmu/dW, dnu/dW, W, b), as the reference wants them."""
    outs = []
    for step in range(steps):
        u = inputs("conv", seed=seed + step)
        x = producer(u)
        if history is not None:
            stats = F.producer_statistics(x.detach(), u, producer)
            history.append([t.numpy() for t in stats] + [producer.weight.detach().numpy().copy(),
                                                         producer.bias.detach().numpy().copy()])
        y = layer(x)
        outs.append(y.detach())
        producer.zero_grad()
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        with torch.no_grad():
            for p in producer.parameters():
                p -= lr * p.grad
    return outs


@pytest.mark.parametrize("backend", PATHS)
def test_frozen_producer_makes_compensation_change_nothing(backend):
    pa, a = pair("conv", 4, compensate=True, backend=backend)
    pb, b = pair("conv", 4, compensate=False, backend=backend)
    for ya, yb in zip(run(pa, a, 6), run(pb, b, 6)):
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", PATHS)
def test_compensation_beats_naive_on_a_slowly_changing_producer(backend):
    producer, layer = pair("conv", 4, backend=backend)
    run(producer, layer, 4, lr=1e-4)  # slow: the weights move by about 1% a step
    valid = layer.window_valid
    w_now, b_now = producer.weight.detach(), producer.bias.detach()
    mu_c, nu_c = F.compensated_window(layer.window_mu[valid], layer.window_nu[valid], layer.window_dmu[valid],
                                      layer.window_dnu[valid], layer.window_dmu_w[valid], layer.window_dnu_w[valid],
                                      layer.window_bias[valid], w_now, b_now)
    # The truth: the same past batches through the current weights.
    slots = torch.arange(3)[valid]
    steps = [int(s) for s in slots]  # with 4 steps and 3 slots, slot s holds step s (steps 0..2), step 3 in slot 0
    steps = [3 if s == 0 else s for s in steps]
    with torch.no_grad():
        truth = [producer(inputs("conv", seed=s)) for s in steps]
    mu_true = torch.stack([t.mean((0, 2, 3)) for t in truth])
    nu_true = torch.stack([t.square().mean((0, 2, 3)) for t in truth])
    err = lambda a, b: float((a - b).abs().max())  # noqa: E731
    naive_mu, naive_nu = layer.window_mu[valid], layer.window_nu[valid]
    assert err(mu_c, mu_true) < 1e-10 < err(naive_mu, mu_true)  # the mean is linear in W: exact
    assert err(nu_c, nu_true) < 0.2 * err(naive_nu, nu_true)  # the second moment: first order


@pytest.mark.parametrize("backend", PATHS)
def test_pooled_statistics_match_the_reference(backend):
    producer, layer = pair("conv", 3, backend=backend)
    history = []
    run(producer, layer, 3, lr=0.05, history=history)  # the window holds the last two steps
    u = inputs("conv", seed=10)
    x = producer(u)
    y = layer(x)
    mu, nu, _, _ = F.producer_statistics(x.detach(), u, producer)
    w, b = producer.weight.detach().numpy(), producer.bias.detach().numpy()
    past = list(zip(*history[-2:]))  # per quantity, the two past entries
    mu_bar, var_bar = R.cross_iteration_statistics(
        [mu.numpy(), *past[0]], [nu.numpy(), *past[1]], [None, *past[2]], [None, *past[3]], [w, *past[4]],
        [b, *past[5]], w, b)
    expected = (x.detach().numpy() - mu_bar[None, :, None, None]) / np.sqrt(var_bar[None, :, None, None] + layer.eps)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-9, atol=1e-10)


def test_gradcheck_through_the_current_statistics():
    producer, layer = pair("conv", 3)
    run(producer, layer, 3, lr=0.05)
    valid = layer.window_valid
    past = (layer.window_mu[valid], layer.window_nu[valid])
    u = inputs("conv", batch=2)
    x = producer(u).detach().requires_grad_()

    def f(x):
        dims = (0, 2, 3)
        mu_bar, var_bar = F.cross_iteration_pool(x.mean(dims), x.square().mean(dims), *past)
        return F.normalize(x, mu_bar, torch.rsqrt(var_bar + 1e-5))

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", PATHS)
def test_checkpoint_resumes_cbn_exactly_and_to_moves_the_window(backend):
    pa, a = pair("conv", 4, backend=backend)
    first = run(pa, a, 3, lr=0.05)
    state = save({**{f"p.{k}": v.contiguous() for k, v in pa.state_dict().items()},
                  **{f"n.{k}": v.contiguous() for k, v in a.state_dict().items()}})
    later = run(pa, a, 3, lr=0.05, seed=3)
    pb, b = pair("conv", 4, backend=backend)
    loaded = load(state)
    pb.load_state_dict({k[2:]: v for k, v in loaded.items() if k.startswith("p.")})
    b.load_state_dict({k[2:]: v for k, v in loaded.items() if k.startswith("n.")})
    assert int(b.iteration) == 3 and bool(b.window_valid.all())
    for ya, yb in zip(later, run(pb, b, 3, lr=0.05, seed=3)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    assert len(first) == 3
    b.float()  # (the derivatives follow the layer; the per-channel statistics stay float64)
    assert b.window_dnu.dtype == torch.float32 and b.window_dnu_w.dtype == torch.float64


def test_a_checkpoint_loads_before_pairing_and_a_wrong_producer_is_refused():
    """Loading before pair() (the derivative buffers take the checkpoint's shapes) resumes exactly
    as loading after it; pairing such a layer with a producer of other shapes is refused, not
    answered with a zeroed window."""
    pa, a = pair("conv", 4)
    run(pa, a, 3, lr=0.05)
    producer_state = {k: v.clone() for k, v in pa.state_dict().items()}
    state = {k: v.clone() for k, v in a.state_dict().items()}
    later = run(pa, a, 3, lr=0.05, seed=3)
    b = bnlab.CrossIterationBatchNorm2d(6, window=4, dtype=torch.float64)
    b.load_state_dict(state)
    pb = PRODUCERS["conv"]().double()
    pb.load_state_dict(producer_state)
    for ya, yb in zip(later, run(pb, b.pair(pb), 3, lr=0.05, seed=3)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    c = bnlab.CrossIterationBatchNorm2d(6, window=4, dtype=torch.float64)
    c.load_state_dict(state)
    with pytest.raises(ValueError, match=r"derivatives for a producer of shape \(2, 18\)"):
        c.pair(nn.Conv2d(4, 6, 3).double())  # groups 1 instead of 2: other shapes
    torch.testing.assert_close(c.window_dnu, state["window_dnu"], rtol=0, atol=0)


def test_a_bn_checkpoint_loads_into_cbn_with_an_empty_window():
    """A pretrained BN backbone's state (torch's or bnlab's) loads strictly: its parameters and
    running statistics, the window empty and the iteration count at 0, so burn-in starts over."""
    producer, cbn = pair("conv", 3)
    run(producer, cbn, 4, lr=0.05)  # a window to replace
    assert bool(cbn.window_valid.any()) and int(cbn.iteration) == 4
    for bn in (nn.BatchNorm2d(6), bnlab.BatchNorm2d(6)):
        bn.double()(torch.randn(8, 6, 3, 3, dtype=torch.float64))
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
        cbn.load_state_dict(bn.state_dict())
        for key, value in bn.state_dict().items():
            assert torch.equal(cbn.state_dict()[key], value), key
        assert int(cbn.iteration) == 0 and not bool(cbn.window_valid.any())
        assert float(cbn.window_dnu.abs().sum()) == 0.0
    window = {k: v for k, v in cbn.state_dict().items() if k.startswith("window") or k == "iteration"}
    with pytest.raises(RuntimeError, match=r"window holds 2 past iterations \(window=3\), this layer's window=5"):
        pair("conv", 5)[1].load_state_dict({**bn.state_dict(), **window})
    naive_producer, naive = pair("conv", 3, compensate=False)
    fresh = {k: v.clone() for k, v in naive.state_dict().items()}
    run(naive_producer, naive, 3, lr=0.05)
    with pytest.raises(RuntimeError, match="naive CBN's"):  # a filled window without derivatives
        pair("conv", 3)[1].load_state_dict(naive.state_dict())
    pair("conv", 3)[1].load_state_dict(fresh)  # (an empty one needs none)
    bnlab.CrossIterationBatchNorm2d(6, window=3, dtype=torch.float64).load_state_dict(fresh)  # (unpaired)
    compensated = pair("conv", 3)
    run(*compensated, 3, lr=0.05)
    plain = pair("conv", 3, compensate=False)[1]  # the ablation, continued naive: derivatives dropped
    plain.load_state_dict(compensated[1].state_dict())
    torch.testing.assert_close(plain.window_mu, compensated[1].window_mu, rtol=0, atol=0)
    assert plain.window_dnu.numel() == 0


@pytest.mark.parametrize("backend", PATHS)
def test_reset_running_stats_empties_the_window_and_keeps_the_iteration(backend):
    """After the reset the next step pools nothing from before it: the window holds only batches
    seen since, so two steps later (window 3) the layer gives what a fresh layer that saw just
    those two batches, past its burn-in, gives."""
    producer, cbn = pair("conv", 3, backend=backend)
    run(producer, cbn, 4)  # (lr 0: the producer stays as it is)
    cbn.reset_running_stats()
    assert int(cbn.iteration) == 4 and not bool(cbn.window_valid.any()) and float(cbn.window_mu.abs().sum()) == 0
    assert torch.equal(cbn.running_var, torch.ones(6)) and int(cbn.num_batches_tracked) == 0
    after = run(producer, cbn, 2, seed=10)
    fresh_producer, fresh = pair("conv", 3, backend=backend)
    torch.testing.assert_close(run(fresh_producer, fresh, 2, seed=10), after, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fresh.running_mean, cbn.running_mean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", PATHS)
def test_burn_in_is_bn(backend):
    pa, a = pair("conv", 4, burn_in=5, backend=backend)
    pb, b = pair("conv", 1, backend=backend)
    valid = []
    for step in range(5):
        ya, yb = run(pa, a, 1, lr=0.05, seed=step)[0], run(pb, b, 1, lr=0.05, seed=step)[0]
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
        valid.append(a.window_valid.tolist())
    # Only the window - 1 = 3 steps before pooling starts are stored: steps 2, 3, 4 in slots 2, 0, 1.
    assert valid == [[False] * 3, [False] * 3, [False, False, True], [True, False, True], [True] * 3]
    torch.testing.assert_close(a.running_var, b.running_var)


def test_cross_iteration_converts_pairs_and_refuses_others():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), bnlab.BatchNorm2d(4),
                        nn.Flatten(), nn.Linear(4 * 9, 5), nn.BatchNorm1d(5))
    net[1].running_mean.fill_(0.25)
    bnlab.cross_iteration(net, window=3, burn_in=10)
    names = [type(net[i]).__name__ for i in (1, 4, 7)]
    assert names == ["CrossIterationBatchNorm2d"] * 2 + ["CrossIterationBatchNorm1d"]
    assert net[1].producer is net[0] and net[7].producer is net[6] and net[1].burn_in == 10
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.25))
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="cannot convert '2': its input comes from '1'.*cannot be compensated.*"
                                         "strict=False"):
        bnlab.cross_iteration(bad)
    # A BN without running statistics normalizes with batch statistics in inference: refused, not
    # turned into a layer that would use running statistics there.
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    with pytest.raises(ValueError, match="cannot convert '1': it keeps no running statistics"):
        bnlab.cross_iteration(untracked)
    assert type(untracked[1]) is nn.BatchNorm2d


class PreActivationBlock(nn.Module):
    """A pre-activation residual block: its first BN normalizes a sum, which cannot be compensated."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(h)))


class Detector(nn.Module):
    """Control flow on a tensor: torch.fx cannot trace it, its backbone it can."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        features = self.backbone(x)
        return features if bool(features.sum() > 0) else -features


def test_an_untraceable_model_is_refused_with_the_way_round():
    model = Detector()
    with pytest.raises(ValueError, match="could not trace.*cross_iteration\\(model.backbone\\).*"
                                         "broadcast_buffers=False.*pair layers by hand"):
        bnlab.cross_iteration(model)
    bnlab.cross_iteration(model.backbone, window=3)
    assert model.backbone[1].producer is model.backbone[0]
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    assert model.backbone[1].window_valid.all()


def test_example_inputs_find_the_pairs_of_a_model_fx_cannot_trace():
    model = Detector()
    model.backbone.append(nn.Conv2d(4, 4, 1))
    model.backbone.append(nn.BatchNorm2d(4))
    model.backbone[1].running_mean.fill_(0.5)
    bnlab.cross_iteration(model, window=3, example_inputs=torch.randn(2, 3, 6, 6))
    assert [type(m).__name__ for m in (model.backbone[1], model.backbone[3])] == ["CrossIterationBatchNorm2d"] * 2
    assert model.backbone[3].producer is model.backbone[2] and model.training  # (its mode kept)
    assert torch.equal(model.backbone[1].running_mean, torch.full((4,), 0.5))  # (the pass changed no state)
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    assert model.backbone[3].window_valid.all()


def test_example_inputs_pair_a_traceable_model_as_torch_fx_does():
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), bnlab.BatchNorm2d(4),
                             nn.Flatten(), nn.Linear(4 * 9, 5), nn.BatchNorm1d(5))

    traced, run = bnlab.cross_iteration(make()), bnlab.cross_iteration(make(), example_inputs=torch.randn(2, 3, 5, 5))
    for net in (traced, run):
        assert [net[i].producer is net[i - 1] for i in (1, 4, 7)] == [True] * 3


class SharedNorm(nn.Module):
    """One BN after two convs in turn: its statistics mix two producers."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("model, refused", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)), "'0''s output, changed in place"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), "not a Linear or Conv2d layer's output"),
    (SharedNorm(), "the outputs of several layers"),
    (Detector(), None),  # (either branch of its control flow runs the backbone)
], ids=["in-place activation", "activation", "shared layer", "none"])
def test_example_inputs_refuse_what_cannot_be_compensated(model, refused):
    x = torch.rand(2, 3, 6, 6)
    if refused is None:
        bnlab.cross_iteration(model, example_inputs=(x,))
        return
    with pytest.raises(ValueError, match=f"cannot convert .*{refused}"):
        bnlab.cross_iteration(model, example_inputs=(x,))


def test_example_inputs_name_a_layer_they_did_not_run():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.unused = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.used(x)

    model = Branches()
    with pytest.warns(UserWarning, match="'unused.1': the example inputs did not run it"):
        bnlab.cross_iteration(model, strict=False, example_inputs=torch.randn(2, 3, 5, 5))
    assert type(model.used[1]).__name__ == "CrossIterationBatchNorm2d" and type(model.unused[1]) is nn.BatchNorm2d


def test_cross_iteration_strict_false_converts_what_it_can_and_names_the_rest():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), PreActivationBlock(), PreActivationBlock())
    with pytest.raises(ValueError, match="cannot convert '2.bn1' \\(and 1 more\\)"):
        bnlab.cross_iteration(net)
    assert type(net[1]) is nn.BatchNorm2d  # (refused before converting anything)
    with pytest.warns(UserWarning, match="kept as BN \\(strict=False\\): '2.bn1': its input comes from '1'.*"
                                         "'3.bn1': its input comes from 'call_function <built-in function add>'"):
        bnlab.cross_iteration(net, window=3, strict=False)
    kinds = [type(m).__name__ for m in (net[1], net[2].bn1, net[2].bn2, net[3].bn1, net[3].bn2)]
    assert kinds == ["CrossIterationBatchNorm2d", "BatchNorm2d", "CrossIterationBatchNorm2d", "BatchNorm2d",
                     "CrossIterationBatchNorm2d"]
    assert net[2].bn2.producer is net[2].conv1
    x = torch.randn(4, 3, 6, 6)
    for _ in range(3):  # (pooling and compensating from the third step)
        net(x).square().mean().backward()
    assert net[3].bn2.window_valid.all()


def test_cross_iteration_names_the_batch_norm_layers_it_leaves():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.SyncBatchNorm(4), nn.Conv2d(4, 4, 1), bnlab.BatchNormAct2d(4),
                        nn.Conv2d(4, 4, 1), bnlab.BatchRenorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"left as they were: '1' \(SyncBatchNorm\), '3' \(BatchNormAct2d\), "
                                         r"'5' \(BatchRenorm2d\);"):
        bnlab.cross_iteration(net)
    kinds = [type(m).__name__ for m in net[1::2]]
    assert kinds == ["SyncBatchNorm", "BatchNormAct2d", "BatchRenorm2d", "CrossIterationBatchNorm2d"]
    import warnings

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with warnings.catch_warnings():  # nothing left, nothing said; converted layers are not "left" either
        warnings.simplefilter("error")
        bnlab.cross_iteration(plain)
        bnlab.cross_iteration(plain)


def test_cross_iteration_keeps_each_layers_momentum_convention():
    """A cumulative average (torch's momentum=None, bnlab's stats="cumulative") stays one, with its
    batch count; it used to become an EMA of momentum 0.1."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=None), nn.Conv2d(4, 4, 1),
                        bnlab.BatchNorm2d(4, momentum=0.3, stats="cumulative"), nn.Conv2d(4, 4, 1),
                        nn.BatchNorm2d(4, momentum=0.05))
    for _ in range(3):
        net(torch.randn(4, 1, 6, 6))
    bnlab.cross_iteration(net)
    conventions = [(net[i].stats, int(net[i].num_batches_tracked)) for i in (1, 3, 5)]
    assert conventions == [("cumulative", 3), ("cumulative", 3), ("ema", 3)]
    assert net[5].momentum == 0.05


def test_unpaired_or_detached_use_is_a_clear_error():
    layer = bnlab.CrossIterationBatchNorm2d(4)
    with pytest.raises(RuntimeError, match="not paired"):
        layer(torch.randn(2, 4, 3, 3))
    layer.pair(nn.Conv2d(3, 4, 1))
    with pytest.raises(RuntimeError, match="did not run on this batch"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="Linear or Conv2d"):
        bnlab.CrossIterationBatchNorm2d(4).pair(nn.Conv1d(3, 4, 1))


@pytest.mark.parametrize("backend", PATHS)
def test_input_must_hold_the_producers_output(backend):
    """The compensation assumes x = producer(u): anything between them that changes the values is
    refused (it used to compensate with derivatives of the wrong function, silently); a copy of the
    output trains as the output itself."""
    torch.manual_seed(0)
    u = [torch.randn(3, 4, 7, 7, dtype=torch.float64) for _ in range(4)]
    results = []
    for between in (lambda x: x, lambda x: x.clone().contiguous(memory_format=torch.channels_last)):
        producer, cbn = pair("conv", 3, backend=backend)
        for batch in u:
            y = cbn(between(producer(batch)))
        results.append((y, cbn.window_dnu.clone(), cbn.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    producer, cbn = pair("conv", 3, backend=backend)
    with pytest.raises(RuntimeError, match="its input is not its producer's output"):
        cbn(2 * producer(u[0]))


def test_pairing_again_keeps_one_hook_on_the_current_producer():
    first, second = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
    cbn = bnlab.CrossIterationBatchNorm2d(4).pair(first)
    cbn.pair(first)
    assert len(first._forward_hooks) == 1
    cbn.pair(second)
    assert len(first._forward_hooks) == 0 and len(second._forward_hooks) == 1 and cbn.producer is second


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_cross_iteration_norm_function(affine):
    from bnlab.autograd import CrossIterationNormFunction

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) if affine else None
    past_mu = torch.randn(4, generator=g, dtype=torch.float64) * 2
    past_nu = past_mu**2 + torch.rand(4, generator=g, dtype=torch.float64) + 1

    def f(x, *wb):
        return CrossIterationNormFunction.apply(x, *(wb or (None, None)), past_mu, past_nu, 3, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b) if affine else (x,))
    assert torch.autograd.gradgradcheck(f, (x, w, b) if affine else (x,))  # (a gradient penalty through it)
    # The forward is the pooled normalization written out.
    dims = (0, 2, 3)
    mu, nu = x.mean(dims), x.square().mean(dims)
    mu_bar = (mu + past_mu) / 3
    var_bar = (torch.maximum(nu, mu**2) + past_nu) / 3 - mu_bar**2
    expected = (x - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var_bar.view(1, -1, 1, 1) + 1e-5)
    if affine:
        expected = expected * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(f(x, *((w, b) if affine else ())), expected)


WINDOW_STATE = ("window_mu", "window_nu", "window_bias", "window_dmu", "window_dnu", "window_dmu_w", "window_dnu_w",
                "window_valid", "running_mean", "running_var", "num_batches_tracked", "iteration")


def assert_same_window(a, b, **tol) -> None:
    """Two layers' windows, running statistics and counts alike, to ``tol`` (assert_close's)."""
    for name in WINDOW_STATE:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol, msg=name)


def sgd_(module: nn.Module, lr: float = 0.1) -> None:
    """One plain SGD step on ``module``'s parameters, their gradients then cleared."""
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
            p.grad = None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("compensate", [True, False])
@pytest.mark.parametrize("kind", list(PRODUCERS))
def test_the_cpu_kernels_take_the_same_steps_as_torch_ops(kind, compensate, dtype):
    """The fused path (numba) against the torch-op path over a training run with a moving
    producer, a non-finite batch in the middle, and the window wrapping around."""
    layers = [pair(kind, 3, dtype=dtype, compensate=compensate, backend=b) for b in PATHS]
    fused, plain = (layer for _, layer in layers)
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    g = torch.Generator().manual_seed(1)
    for step in range(7):
        u = inputs(kind, batch=4, seed=step).to(dtype)
        if step == 3:
            u[0].fill_(float("nan"))
        outs = []
        for producer, layer in layers:
            x = producer(u)
            if step == 3:
                with pytest.warns(RuntimeWarning, match="non-finite"):
                    y = layer(x)
            else:
                y = layer(x)
            assert (layer._kernel_state(x) is not None) == (layer.backend == "auto")
            producer.zero_grad(), layer.zero_grad()
            weights = torch.randn(y.shape, generator=g, dtype=dtype) if not outs else outs[0][1]
            torch.nan_to_num(y * weights).sum().backward()
            with torch.no_grad():
                for p in (*producer.parameters(), *layer.parameters()):
                    p -= 0.05 * torch.nan_to_num(p.grad)
            outs.append((y.detach(), weights, producer.weight.grad.clone(), layer.weight.grad.clone()))
        if step != 3:
            for a, b in zip(outs[0][2:], outs[1][2:]):
                torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
        for name in WINDOW_STATE:
            torch.testing.assert_close(getattr(fused, name), getattr(plain, name), **tol, msg=f"{name} at step {step}")
    assert int(fused.num_batches_tracked) == 6 and bool(fused.window_valid.all())


@pytest.mark.parametrize("backend", PATHS)
def test_weight_gradient_from_the_producer_hook_is_the_one_from_the_layer_input(backend):
    """The conv's weight gradient taken in the producer's hook (right after the conv) gives the
    same window as one taken from the layer's input; a layer whose input is not the producer's
    output object (an identity op between them) takes its own."""
    (pa, a), (pb, b) = pair("conv", 3, backend=backend), pair("conv", 3, backend=backend)
    taken = []
    a_hook = a._capture

    def spy(module, args, output):
        a_hook(module, args, output)
        taken.append(a.__dict__["_input"][2] is not None)

    a._hook.remove()
    a.__dict__["_hook"] = pa.register_forward_hook(spy)
    for step in range(5):
        u = inputs("conv", seed=step)
        ya, yb = a(pa(u)), b(pb(u).clone())  # b: the hook's output is not the layer's input
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        for layer, y in ((a, ya), (b, yb)):
            y.square().sum().backward()
        with torch.no_grad():
            for p, q in zip(pa.parameters(), pb.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
                p.grad, q.grad = None, None
    assert all(taken)  # (every step stores: window 3, no burn-in)
    assert_same_window(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_fused_cross_iteration_norm_function(affine):
    from bnlab.autograd import FusedCrossIterationNormFunction

    producer, layer = pair("conv", 3, affine=affine)
    run(producer, layer, 3, lr=0.05)  # a full window, compensated to weights that moved
    x = producer(inputs("conv", batch=2, seed=9)).detach().requires_grad_()
    state = layer._kernel_state(x)
    params = (layer.weight, layer.bias) if affine else ()

    stats = np.empty((5, x.shape[1]))

    def f(x, *wb):
        return FusedCrossIterationNormFunction.apply(x, *(wb or (None, None)), layer.eps, True, state.norm, stats)

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))  # (create_graph=True: autograd through torch ops)
    # The forward is the pooled normalization of the torch path, whose statistics the reference checks.
    past_mu, past_nu, n = layer._past_statistics(3)
    from bnlab.autograd import CrossIterationNormFunction

    expected, mu, var = CrossIterationNormFunction.apply(x, *(params or (None, None)), past_mu, past_nu, n + 1,
                                                         layer.eps)
    torch.testing.assert_close(f(x, *params), expected, rtol=1e-10, atol=1e-12)
    # stats: the batch's mean and biased variance, the pooled mean and 1/sqrt(sigma2 + eps), and k
    torch.testing.assert_close(torch.from_numpy(stats[:2]), torch.stack([mu, var]).detach(), rtol=1e-10, atol=1e-12)
    pooled_mu = (past_mu + mu.detach()) / (n + 1)
    pooled_var = (past_nu + var.detach() + mu.detach() ** 2) / (n + 1) - pooled_mu**2
    torch.testing.assert_close(torch.from_numpy(stats[2:4]), torch.stack([pooled_mu, (pooled_var + layer.eps).rsqrt()]),
                               rtol=1e-10, atol=1e-12)
    assert stats[4, 0] == n + 1


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_replayed_cross_iteration_norm_function(affine):
    """Activation checkpointing's replay of the fused forward: at the recorded batch, the fused
    forward's output and statistics from the past sums it pooled; a function of x whose gradient
    is the pooled normalization's."""
    from bnlab.autograd import FusedCrossIterationNormFunction, ReplayedCrossIterationNormFunction

    producer, layer = pair("conv", 3, affine=affine)
    run(producer, layer, 3, lr=0.05)
    x = producer(inputs("conv", batch=2, seed=9)).detach().requires_grad_()
    state = layer._kernel_state(x)
    params = (layer.weight, layer.bias) if affine else ()
    wb = params or (None, None)
    recorded, replayed = np.empty((5, x.shape[1])), np.empty((5, x.shape[1]))
    expected = FusedCrossIterationNormFunction.apply(x, *wb, layer.eps, True, state.norm, recorded)
    assert recorded[4, 0] == 3  # (a full window: the compensated entries are in the sums)
    past = F.pooled_past_sums(recorded, layer.eps)

    def f(x, *wb):
        return ReplayedCrossIterationNormFunction.apply(x, *(wb or (None, None)), layer.eps, past, state.norm,
                                                        replayed)

    torch.testing.assert_close(f(x, *params), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(replayed[:4], recorded[:4], rtol=1e-10, atol=1e-12)
    assert replayed[4, 0] == 3
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_the_kernels_follow_tensors_that_moved():
    """The cached NumPy views are remade when a tensor behind them is replaced, not written to stale memory."""
    pa, a = pair("conv", 3)
    pb, b = pair("conv", 3)
    run(pa, a, 4, lr=0.05)
    run(pb, b, 2, lr=0.05, seed=20)
    copies = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
    b.load_state_dict(copies(a), assign=True)  # new tensors in b, not copies into its old ones
    pb.load_state_dict(copies(pa), assign=True)
    for ya, yb in zip(run(pa, a, 3, lr=0.05, seed=4), run(pb, b, 3, lr=0.05, seed=4)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for name in WINDOW_STATE:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    x = torch.zeros(1, 6, 2, 2, dtype=torch.float64)
    old = b._kernel_state(x)
    assert b._kernel_state(x) is old  # kept while nothing moved
    pb.weight.data = pb.weight.data.clone() * 2  # new storage under the same Parameter
    new = b._kernel_state(x)
    assert new is not old and np.shares_memory(new.norm[3][0], pb.weight.detach().numpy())
    assert not np.shares_memory(old.norm[3][0], pb.weight.detach().numpy())


def test_a_producer_weight_that_is_not_contiguous_trains_as_on_torch_ops():
    """A weight stored permuted (ported from a framework that keeps kernels as H, W, in, out)
    is not contiguous: its (C, F) reshape is a copy, which the kernels once kept and compensated
    with at every later step, stale (until 2026-11-24). Such a producer takes the torch ops; a
    weight transposed in place under ``.data =``, at the same address, is noticed too."""
    (pa, a), (pb, b) = pair("conv", 3, backend="auto"), pair("conv", 3, backend="native")
    for producer in (pa, pb):
        producer.weight.data = producer.weight.data.transpose(2, 3).contiguous().transpose(2, 3)
    assert not pa.weight.is_contiguous() and pa(inputs("conv")).is_contiguous()
    for ya, yb in zip(run(pa, a, 5, lr=0.05), run(pb, b, 5, lr=0.05)):
        torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-11)
    assert a._kernel_state(pa(inputs("conv"))) is None
    (pa, a), (pb, b) = pair("conv", 3, backend="auto"), pair("conv", 3, backend="native")
    run(pa, a, 2, lr=0.05), run(pb, b, 2, lr=0.05)  # (the kernels' views made for the contiguous weight)
    for producer in (pa, pb):
        producer.weight.data = producer.weight.data.transpose(2, 3)  # (the same address, new strides)
    for ya, yb in zip(run(pa, a, 4, lr=0.05, seed=2), run(pb, b, 4, lr=0.05, seed=2)):
        torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("channels, size", [(1, 8), (4, 3)])  # (one channel; one output position)
def test_a_channels_last_batch_whose_conv_output_is_contiguous_trains_as_on_torch_ops(channels, size):
    """A channels_last batch (``model.to(memory_format=torch.channels_last)``, or the input's
    own) through a conv with one output channel, or one output position, gives an output that is
    contiguous too, so the kernels take it; torch's weight gradient then comes channels_last, and
    the layer's (C, F) view of it failed ("view size is not compatible") until 2026-11-25."""
    torch.manual_seed(0)
    producer = nn.Conv2d(3, channels, 3, dtype=torch.float64)
    twin = copy.deepcopy(producer)
    a = bnlab.CrossIterationBatchNorm2d(channels, window=3, dtype=torch.float64).pair(producer)
    b = bnlab.CrossIterationBatchNorm2d(channels, window=3, dtype=torch.float64, backend="native").pair(twin)
    for step in range(5):
        u = torch.randn(4, 3, size, size, dtype=torch.float64) * 2 + 1
        ya = a(producer(u.contiguous(memory_format=torch.channels_last)))
        yb = b(twin(u))
        torch.testing.assert_close(ya, yb, rtol=1e-9, atol=1e-11)
        weights = torch.randn_like(yb)
        (ya * weights).sum().backward()
        (yb * weights).sum().backward()
        sgd_(producer), sgd_(twin), sgd_(a), sgd_(b)
    assert a._kernel_state(ya) is not None  # (the kernels took these steps)
    assert_same_window(a, b, rtol=1e-9, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2),
       st.sampled_from([1, 2]), st.integers(3, 7), st.integers(3, 7))
def test_kernel_mean_patches_equal_unfold(kh, kw, stride, padding, dilation, groups, h, w):
    from bnlab.kernels import cpu_cbn

    conv = nn.Conv2d(4, 2, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups)
    u = torch.randn(3, 4, h, w, dtype=torch.float64)
    if (h + 2 * padding - dilation * (kh - 1)) < 1 or (w + 2 * padding - dilation * (kw - 1)) < 1:
        return  # no output position
    out = np.empty((groups, 4 // groups * kh * kw))
    cpu_cbn.mean_patches(u.numpy(), kh, kw, stride, stride, padding, padding, dilation, dilation, groups, out)
    np.testing.assert_allclose(out, F.mean_patches(u, conv).numpy(), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
       st.integers(1, 2), st.integers(3, 9), st.integers(3, 9), st.booleans())
def test_kernel_second_moment_derivatives_equal_the_weight_gradients(kh, kw, stride, padding, dilation, c_in, h, w,
                                                                     bias):
    """store_conv_moments' d nu/dW = 2/m (W S + b s) against 2/m times torch's weight gradient from
    the conv's output, on small maps and on one whose patches take several chunks."""
    from bnlab.kernels import cpu_cbn

    if (h + 2 * padding - dilation * (kh - 1)) < 1 or (w + 2 * padding - dilation * (kw - 1)) < 1:
        return  # no output position
    torch.manual_seed(h * w)
    for shape in ((3, c_in, h, w), (2, c_in, 40 * h, 30 * w)):  # (the second: >4096 positions, several chunks)
        conv = nn.Conv2d(c_in, 5, (kh, kw), stride=stride, padding=padding, dilation=dilation, bias=bias).double()
        u = torch.randn(shape, dtype=torch.float64) + 0.3
        x = conv(u)
        dmu, dnu = np.zeros((2, 1, conv.weight[0].numel())), np.zeros((2, 5, conv.weight[0].numel()))
        dmu_w, dnu_w = np.zeros((2, 5)), np.zeros((2, 5))
        b = conv.bias.detach().numpy() if bias else np.zeros(5)
        weight = conv.weight.detach().reshape(5, -1).numpy()
        cpu_cbn.store_conv_moments(1, u.numpy(), kh, kw, stride, stride, padding, padding, dilation, dilation,
                                   weight, b, dmu, dnu, dmu_w, dnu_w)
        expected = F.second_moment_derivative(x, u, conv).reshape(5, -1)
        np.testing.assert_allclose(dnu[1], expected.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dmu[1], F.mean_patches(u, conv).numpy(), rtol=1e-12, atol=1e-12)
        # the products with W: <d mu/dW, W> = mu - b and <d nu/dW, W> = 2 (nu - b mu), as x = W patch + b
        mu, nu = x.mean((0, 2, 3)).detach().numpy(), x.square().mean((0, 2, 3)).detach().numpy()
        np.testing.assert_allclose(dmu_w[1], mu - b, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(dnu_w[1], 2 * (nu - b * mu), rtol=1e-10, atol=1e-10)
        assert not dnu[0].any() and not dmu[0].any() and not dnu_w[0].any()  # (only the slot's entry)


@pytest.mark.parametrize("padding", [{"padding": 1, "padding_mode": "circular"}, {"padding": "valid"},
                                     {"padding": "same", "padding_mode": "replicate"}])
def test_every_padding_of_conv2d_is_compensated(padding):
    """Padding modes and string paddings used to be refused; the derivatives are taken over the
    input padded as the conv pads it (the parametrized tests run reflect and uneven "same")."""
    conv = nn.Conv2d(3, 4, 3, **padding).double()
    u = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    x = conv(u)
    mu, nu, dmu, dnu = F.producer_statistics(x, u, conv)
    torch.testing.assert_close(dmu, torch.autograd.grad(mu.sum(), conv.weight, retain_graph=True)[0])
    torch.testing.assert_close(dnu, torch.autograd.grad(nu.sum(), conv.weight)[0])


def test_kernels_take_gradients_in_any_layout():
    grads = []
    for backend in PATHS:
        producer, layer = pair("conv", 2, backend=backend)
        run(producer, layer, 2, lr=0.05)
        x = producer(inputs("conv", seed=5)).detach().requires_grad_()
        y = layer(x)
        dy = torch.randn(y.shape[::-1], dtype=y.dtype, generator=torch.Generator().manual_seed(2)).permute(3, 2, 1, 0)
        y.backward(dy)  # a transposed gradient, not contiguous
        grads.append((x.grad, layer.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_recalibrate_gives_cbn_the_population_statistics_of_bn_and_leaves_its_window():
    pa, a = pair("conv", 3)
    pb, b = pair("conv", 1)  # window 1: BN
    run(pa, a, 4, lr=0.05)
    pb.load_state_dict(pa.state_dict())
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("window")}, strict=False)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    batches = [inputs("conv", seed=30 + i) for i in range(3)]
    for producer, layer in ((pa, a), (pb, b)):
        bnlab.recalibrate(nn.Sequential(producer, layer), batches)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
    assert not torch.equal(a.running_var, before["running_var"])
    for k, v in a.state_dict().items():
        if not k.startswith("running"):
            assert torch.equal(v, before[k]), k


def test_a_trained_layer_deep_copies_and_pickles():
    """copy.deepcopy (EMA models, model selection) and pickling work after steps on the kernels,
    and the copy trains on its own tensors, exactly as the original does."""
    import copy
    import pickle

    producer, layer = pair("conv", 3)
    run(producer, layer, 3, lr=0.05)
    model = nn.Sequential(producer, layer)
    twin = copy.deepcopy(model)
    assert twin[1].producer is twin[0]
    for ya, yb in zip(run(producer, layer, 2, lr=0.05, seed=7), run(twin[0], twin[1], 2, lr=0.05, seed=7)):
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    for name in WINDOW_STATE:
        assert torch.equal(getattr(layer, name), getattr(twin[1], name)), name
        assert getattr(layer, name).data_ptr() != getattr(twin[1], name).data_ptr() or getattr(layer, name).numel() == 0
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored[1].window_dnu, layer.window_dnu)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_shift_of_the_mean_gets_1_minus_1_over_k_of_its_gradient(kind, backend):
    """Why CBN needs a low learning rate (the layer's docstring): under BN the gradient with respect
    to a uniform shift of a channel, sum_i dL/dx_i, is zero; under CBN, with the window's statistics
    equal to the batch's (the same batch k times, the producer frozen), it is (1 - 1/k) gamma / sigma
    sum_i dL/dy_i: the share of the mean that comes from the past."""
    k = 4
    producer, cbn = pair(kind, k, backend=backend)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 2.0)
    u = inputs(kind, batch=4)
    for _ in range(k):
        x = producer(u).detach().requires_grad_()
        producer(u)  # (the hook takes the producer's input)
        y = cbn(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dims = [d for d in range(x.dim()) if d != 1]
    sigma = x.detach().var(dims, unbiased=False).add(cbn.eps).sqrt()
    expected = (1 - 1 / k) * cbn.weight.detach() / sigma * dy.sum(dims)
    torch.testing.assert_close(x.grad.sum(dims), expected, rtol=1e-8, atol=1e-10)
    assert expected.abs().min() > 1e-3  # (a real gradient, not 0 = 0)
    bn = (bnlab.BatchNorm1d if kind == "linear" else bnlab.BatchNorm2d)(cbn.num_features, dtype=torch.float64)
    xb = x.detach().clone().requires_grad_()
    bn(xb).backward(dy)
    assert xb.grad.sum(dims).abs().max() < 1e-10


COMPUTED_WEIGHTS = {
    "weight norm, parametrization": torch.nn.utils.parametrizations.weight_norm,
    "weight norm, forward hook": torch.nn.utils.weight_norm,  # (the older forms: torch's own deprecated one,
    "spectral norm, forward hook": torch.nn.utils.spectral_norm,  # and still GANs' usual spectral norm)
    "pruned, forward hook": lambda conv: prune.random_unstructured(conv, "weight", 0.5),
}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("computed", list(COMPUTED_WEIGHTS))
def test_a_producer_with_a_computed_weight_is_compensated_with_it(computed):
    """A producer whose weight is computed (weight norm, weight standardization through
    torch.nn.utils.parametrize; the forward pre-hooks of torch.nn.utils.prune, weight_norm and
    spectral_norm, which set the attribute from weight_orig and a mask, weight_g/weight_v or
    weight_orig) used to fail with
    a KeyError on the kernels' path. Its layer now takes the same steps as one after a plain conv
    that holds the computed weight each step."""
    torch.manual_seed(0)
    normed = COMPUTED_WEIGHTS[computed](nn.Conv2d(3, 4, 3).double())
    plain = nn.Conv2d(3, 4, 3).double()
    layers = [bnlab.CrossIterationBatchNorm2d(4, window=3, dtype=torch.float64).pair(p) for p in (normed, plain)]
    for step in range(6):
        u = inputs("conv-nobias", batch=4, seed=step)
        x = normed(u)  # (a hook sets the weight here, before the conv)
        with torch.no_grad():
            plain.weight.copy_(normed.weight)
            plain.bias.copy_(normed.bias)
        ys = [layers[0](x), layers[1](plain(u))]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-9, atol=1e-11)
        ys[0].square().mean().backward()
        sgd_(normed)
    assert layers[0]._kernel_state(ys[0]) is None and layers[1]._kernel_state(ys[1]) is not None
    assert_same_window(layers[0], layers[1], rtol=1e-9, atol=1e-11)
    assert layers[0].window_valid.all() and layers[0].window_dnu.abs().max() > 0  # (a window that was compensated)


@pytest.mark.parametrize("how", ["pruned", "parametrized"])
def test_a_layer_whose_own_gamma_is_computed_trains_as_one_holding_its_value(how):
    """(Network slimming prunes BN's gammas with torch.nn.utils.prune; a parametrization keeps them
    positive. The layer's kernel path looked its gamma up among its parameters: KeyError.) Over
    SGD steps of the producer it equals a layer whose plain gamma holds the computed value."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3).double() for _ in range(2)]
    convs[1].load_state_dict(convs[0].state_dict())
    layers = [bnlab.CrossIterationBatchNorm2d(4, window=3, dtype=torch.float64).pair(conv) for conv in convs]
    with torch.no_grad():
        layers[0].weight.uniform_(0.5, 1.5)
    if how == "pruned":
        prune.l1_unstructured(layers[0], "weight", 2)
    else:
        torch.nn.utils.parametrize.register_parametrization(layers[0], "weight", nn.Softplus())
    for step in range(6):
        with torch.no_grad():
            layers[1].weight.copy_(layers[0].weight)
        u = inputs("conv-nobias", batch=4, seed=step)
        ys = [layer(conv(u)) for layer, conv in zip(layers, convs)]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-9, atol=1e-11)
        for y, conv in zip(ys, convs):
            y.square().mean().backward()
            sgd_(conv)
    assert layers[0]._kernel_state(ys[0]) is None and layers[1]._kernel_state(ys[1]) is not None
    assert_same_window(layers[0], layers[1], rtol=1e-9, atol=1e-11)


def test_the_settings_that_shape_the_window_are_read_only_and_its_buffers_are_checked():
    """(Setting window or compensate after construction, or replacing a window buffer by one of
    another shape, had the numba kernels index past the buffers' ends: a segmentation fault.)"""
    conv = nn.Conv2d(3, 4, 3)
    layer = bnlab.CrossIterationBatchNorm2d(4, window=3).pair(conv)
    layer(conv(torch.randn(4, 3, 8, 8)))
    layer.window, layer.compensate = 3, True  # (the same values: nothing changes)
    for name, value in (("window", 6), ("compensate", False)):
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction .* make a new layer"):
            setattr(layer, name, value)
    assert (layer.window, layer.compensate) == (3, True)
    layer.window_mu = torch.zeros(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"buffers' shapes do not fit .* \(5, 4\), \(2, 4\)"):
        layer(conv(torch.randn(4, 3, 8, 8)))


@pytest.mark.parametrize("found_by", ["tracing", "example inputs"])
def test_cross_iteration_pairs_the_layers_of_a_model_built_with_them_as_they_are(found_by):
    """(A model built with norm_layer=partial(CrossIterationBatchNorm2d, ...), as torchvision's and
    timm's constructors take it, could not train: the layers' error said to call cross_iteration,
    which left them unpaired.)"""
    norm = functools.partial(bnlab.CrossIterationBatchNorm2d, window=3, burn_in=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False), norm(4),
                        nn.Flatten(), nn.Linear(16, 5), bnlab.CrossIterationBatchNorm1d(5, window=2))
    layers = [net[1], net[4], net[7]]
    example = {"example_inputs": torch.randn(2, 3, 6, 6)} if found_by == "example inputs" else {}
    converted = bnlab.cross_iteration(net, window=6, **example)
    assert [converted[i] for i in (1, 4, 7)] == layers  # (the same layers, their own settings)
    assert [(layer.producer, layer.window, layer.burn_in) for layer in layers] == [
        (net[0], 3, 2), (net[3], 3, 2), (net[6], 2, 0)]
    for _ in range(4):
        converted(torch.randn(4, 3, 6, 6)).sum().backward()
    assert all(layer.window_valid.all() for layer in layers)
    stray = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), norm(4))  # (no producer before it)
    with pytest.raises(ValueError, match="cannot pair '2': its input comes from '1'.* put it straight after"):
        bnlab.cross_iteration(stray, strict=False)


def test_lazy_producers_say_to_run_a_forward_first_and_example_inputs_runs_it():
    """(A model of LazyConv2d/LazyLinear not run yet failed inside torch with "Can't access the
    shape of an uninitialized parameter", on load_state_dict's behalf.)"""
    def lazy_net():
        return nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5),
                             nn.BatchNorm1d(5))

    with pytest.raises(ValueError, match="its producer, a LazyConv2d, is lazy .* example_inputs"):
        bnlab.cross_iteration(lazy_net(), window=3)
    net = bnlab.cross_iteration(lazy_net(), window=3, example_inputs=torch.randn(2, 3, 6, 6))
    assert [type(m).__name__ for m in net][:2] == ["Conv2d", "CrossIterationBatchNorm2d"]
    assert net[1].producer is net[0] and net[5].producer is net[4] and net[5].window_dnu.shape == (2, 5, 64)
    for _ in range(3):
        net(torch.randn(4, 3, 6, 6)).sum().backward()
    assert net[1].window_valid.all()


def test_a_producer_whose_forward_transforms_its_weight_is_refused():
    """A subclass that convolves with something else than producer.weight (a weight-standardized
    conv written as a forward) would be compensated with the wrong weights, silently."""
    class StandardizedConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    conv = StandardizedConv(3, 4, 3)
    layer = bnlab.CrossIterationBatchNorm2d(4, window=3).pair(conv)
    with pytest.raises(ValueError, match="not the StandardizedConv of its input by producer.weight.*parametrize"):
        layer(conv(torch.randn(4, 3, 6, 6)))


def test_a_model_built_on_the_meta_device_converts_and_trains_after_to_empty():
    """Large models are built without memory (torch.device("meta")), then materialized. The
    converters read flags on the host, which a meta tensor cannot give (they raised)."""
    with torch.device("meta"):
        net = bnlab.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5),
                                          nn.BatchNorm1d(5)))
        net = bnlab.cross_iteration(net, window=3)
    net = net.to_empty(device="cpu")
    net[1].iteration.fill_(12345)  # (to_empty's memory holds anything: the burn-in's count too)
    for module in net.modules():
        if hasattr(module, "reset_parameters"):  # (the layer as new; reset_running_stats keeps the count)
            module.reset_parameters()
    assert float(net[1].running_var.sum()) == 4.0 and not net[1].window_valid.any() and int(net[1].iteration) == 0
    for step in range(3):
        net(torch.randn(4, 3, 4, 4)).square().mean().backward()
    assert net[1].window_valid.all() and net[4].window_valid.all() and int(net[1].num_batches_tracked) == 3
    assert int(net[1].iteration) == 3


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("kind", ["conv", "linear", "conv-moments"])
def test_float32_keeps_the_variance_of_a_channel_whose_mean_dwarfs_its_spread(kind, backend):
    """nu and <d nu/dW, W> are of the size of mu^2 and the pooled variance is their difference with
    mu^2: with the window in float32, a channel with mean 1,000 and spread about 1 lost its variance
    whole (here outputs off by 0.15-0.44 on the kernels and 0.47-2.4 on torch ops from the first
    pooled step on; the same with the producer frozen). With the window's statistics in float64,
    float32 CBN stays within 1e-3 of float64 CBN."""
    results = {}
    for dtype in (torch.float64, torch.float32):
        producer, layer = pair(kind, 4, dtype=dtype, backend=backend)
        with torch.no_grad():
            producer.bias += 1000.0
        outs = []
        for step in range(6):
            u = inputs(kind, batch=4, seed=step).to(dtype)
            y = layer(producer(u))
            outs.append(y.detach().double())
            producer.zero_grad()
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
            with torch.no_grad():
                for p in producer.parameters():
                    p -= 1e-3 * p.grad
        assert layer.iteration == 6 and bool(layer.window_valid.all())
        results[dtype] = outs, layer.running_var.double()
    (exact, var64), (single, var32) = results[torch.float64], results[torch.float32]
    for step, (a, b) in enumerate(zip(exact, single)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3, msg=lambda m: f"step {step}: {m}")
    torch.testing.assert_close(var32, var64, rtol=1e-4, atol=0)


def autograd_statistics(producer, u):
    """The producer's per-channel mu and nu on ``u``, their derivatives with respect to its weight by
    autograd (channel j depends on row j only: the gradient of sum_j stat_j has d stat_j / d W_j in
    row j), and the weight and bias they were taken at (the reference moves mu by a change db of the
    bias and nu by 2 mu db itself), in the order ``reference.cross_iteration_statistics`` takes."""
    weight = producer.weight.detach().clone().requires_grad_(True)
    bias = None if producer.bias is None else producer.bias.detach().clone()
    if isinstance(producer, nn.Linear):
        x = nn.functional.linear(u, weight, bias)
    else:
        x = producer._conv_forward(u, weight, bias)
    dims = [d for d in range(x.dim()) if d != 1]
    mu, nu = x.mean(dims), x.square().mean(dims)
    dmu, = torch.autograd.grad(mu.sum(), weight, retain_graph=True)
    dnu, = torch.autograd.grad(nu.sum(), weight)
    return [t.detach().numpy() for t in (mu, nu, dmu, dnu, weight)] + [None if bias is None else bias.numpy()]


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_a_training_run_follows_equations_7_to_9_with_autograd_derivatives(data):
    """Over a training run of a random producer (Linear or Conv2d: stride, padding, dilation, groups,
    bias) with a random window, burn-in, batch, affine flag and compensation (or naive CBN), on
    either path, each step's output is the reference's pooling
    (``reference.cross_iteration_statistics``) of the current batch and the window's last k - 1
    batches (none during the burn-in), whose derivatives autograd takes here independently of the
    layer; and the input's gradient is the one through the current batch's statistics alone. The
    running statistics follow the current batch (recomputed by hand), and inference uses them."""
    draw = data.draw
    bias = draw(st.booleans())
    if draw(st.booleans()):
        producer, dims = nn.Linear(draw(st.integers(2, 9)), draw(st.integers(1, 6)), bias=bias), 1
        shape = (draw(st.integers(2, 6)), producer.in_features)
    else:
        groups = draw(st.sampled_from([1, 2]))
        producer = nn.Conv2d(groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 4)),
                             draw(st.integers(1, 3)), stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 1)),
                             dilation=draw(st.integers(1, 2)), groups=groups, bias=bias)
        side = draw(st.integers(5, 8))
        shape, dims = (draw(st.integers(1, 4)), producer.in_channels, side, side), 2
        assume(producer(torch.zeros(shape))[:, 0].numel() > 1)  # (a variance needs two values per channel)
    window, burn_in, affine = draw(st.integers(1, 5)), draw(st.integers(0, 3)), draw(st.booleans())
    compensate = draw(st.booleans())  # (False: naive CBN, the window's raw statistics)
    cls = (bnlab.CrossIterationBatchNorm1d, bnlab.CrossIterationBatchNorm2d)[dims - 1]
    producer = producer.double()
    layer = cls(producer.weight.shape[0], window=window, burn_in=burn_in, compensate=compensate, affine=affine,
                dtype=torch.float64, backend=draw(st.sampled_from(PATHS))).pair(producer)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g), layer.bias.uniform_(-0.5, 0.5, generator=g)
    history, running_mean, running_var = [], np.zeros(layer.num_features), np.ones(layer.num_features)
    for step in range(8):
        spread, shift = 0.5 + torch.rand(2, generator=g, dtype=torch.float64)
        u = torch.randn(shape, generator=g, dtype=torch.float64) * spread + (shift - 1) * 2
        now = autograd_statistics(producer, u)
        x = producer(u)
        y = layer(x)
        past = history[max(0, len(history) - window + 1) :] if step >= burn_in and window > 1 else []
        entries = [now, *past]
        mu_bar, var_bar = R.cross_iteration_statistics(*([e[i] for e in entries] for i in range(6)), now[4], now[5],
                                                       compensate)
        view = (1, -1) + (1,) * (x.dim() - 2)
        # The current batch's share of the pooled statistics as torch ops of x, the window's share
        # (what the reference pooled, less the current batch's) a constant: the gradient's path.
        k, reduced = len(entries), [0, *range(2, x.dim())]
        past_mu = torch.from_numpy(mu_bar - now[0] / k)
        past_nu = torch.from_numpy(var_bar + mu_bar**2 - np.maximum(now[1], now[0] ** 2) / k)
        xd = x.detach().requires_grad_(True)
        mu_now, nu_now = xd.mean(reduced), xd.square().mean(reduced)
        mu_pooled = mu_now / k + past_mu
        nu_pooled = torch.maximum(nu_now, mu_now**2) / k + past_nu
        expected = (xd - mu_pooled.view(view)) / torch.sqrt(nu_pooled - mu_pooled**2 + layer.eps).view(view)
        if affine:
            expected = expected * layer.weight.detach().view(view) + layer.bias.detach().view(view)
        torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10, msg=f"output at step {step}")
        upstream = torch.randn(y.shape, generator=g, dtype=torch.float64)
        grad_x, grad_w = torch.autograd.grad((y * upstream).sum(), (x, producer.weight))
        expected_grad, = torch.autograd.grad((expected * upstream).sum(), xd)
        torch.testing.assert_close(grad_x, expected_grad, rtol=1e-8, atol=1e-10, msg=f"input gradient at step {step}")
        history.append(now)
        # the running statistics follow the current batch alone, as BN's (momentum 0.1, unbiased variance)
        m = x[:, 0].numel()
        running_mean = 0.9 * running_mean + 0.1 * now[0]
        running_var = 0.9 * running_var + 0.1 * (now[1] - now[0] ** 2) * m / (m - 1)
        torch.testing.assert_close(layer.running_mean.numpy(), running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var.numpy(), running_var, rtol=1e-8, atol=1e-10)
        assert int(layer.num_batches_tracked) == int(layer.iteration) == step + 1
        with torch.no_grad():  # (the producer moves: every past entry needs its compensation)
            producer.weight -= 0.05 * grad_w
            if bias:
                producer.bias += 0.05 * torch.randn(producer.bias.shape, generator=g, dtype=torch.float64)
    x = producer(u).detach()
    mean, var = torch.from_numpy(running_mean).view(view), torch.from_numpy(running_var).view(view)
    expected = (x - mean) / torch.sqrt(var + layer.eps)
    if affine:
        expected = expected * layer.weight.detach().view(view) + layer.bias.detach().view(view)
    torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-9, atol=1e-10)  # (inference: BN's, on them)
