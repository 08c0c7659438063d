"""Batch Renormalization and Ghost BN against the NumPy reference, BN, and their own definitions."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import functional as F
from bnlab import reference as R
from conftest import rel_err


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1, torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)


def test_renorm_schedule_is_the_papers():
    lim = lambda t: F.renorm_limits(t, 3.0, 5.0, 5_000, 40_000, 25_000)  # noqa: E731
    assert lim(0) == (1.0, 0.0) and lim(5_000) == (1.0, 0.0)
    assert lim(22_500) == pytest.approx((2.0, 4.375))  # halfway to 40k for r, 7/8 of the way to 25k for d
    assert lim(25_000) == pytest.approx((1 + 2 * 20 / 35, 5.0)) and lim(60_000) == (3.0, 5.0)
    # no ramp (its end not past the warm-up): the limits at once after the warm-up's steps, not a step late
    assert F.renorm_limits(0, 3.0, 5.0, 0, 0, 0) == (3.0, 5.0)
    assert F.renorm_limits(1, 3.0, 5.0, 2, 2, 1) == (1.0, 0.0) and F.renorm_limits(2, 3.0, 5.0, 2, 2, 1) == (3.0, 5.0)


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 2, 3)])
def test_batch_renorm_training_matches_reference_and_its_gradient_is_bn_times_r(shape):
    x, dy = data(shape)
    layer = bnlab.BatchRenorm2d(4, dtype=torch.float64, warmup=0, r_max_steps=1, d_max_steps=1,
                                r_max=1.5, d_max=0.5) if len(shape) == 4 else \
        bnlab.BatchRenorm1d(4, dtype=torch.float64, warmup=0, r_max_steps=1, d_max_steps=1, r_max=1.5, d_max=0.5)
    layer.num_batches_tracked.fill_(10)  # past the schedule: limits 1.5 and 0.5
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 3.0, 1.0, -2.0]))
        layer.running_std.copy_(torch.tensor([1.0, 0.5, 4.0, 2.0]))
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    xr = x.clone().requires_grad_()
    y = layer(xr)
    ref = R.batch_renorm_train(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(),
                               mu.numpy(), sigma.numpy(), 1.5, 0.5)
    assert rel_err(y, ref["y"]) < 1e-10
    assert (ref["r"] != 1).any() and (np.abs(ref["d"]) == 0.5).any()  # the clipping is exercised
    y.backward(dy)
    # r and d are constants: dL/dx is BN's backward of dy * gamma * r.
    xb = x.clone().requires_grad_()
    nd = x.dim()
    scale = (layer.weight.detach() * torch.from_numpy(ref["r"])).view(1, -1, *[1] * (nd - 2))
    torch.nn.functional.batch_norm(xb, None, None, training=True, eps=layer.eps).backward(dy * scale)
    assert rel_err(xr.grad, xb.grad.numpy()) < 1e-10
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.99 * mu.numpy() + 0.01 * ref["mu_B"], rtol=1e-12)
    np.testing.assert_allclose(layer.running_std.numpy(), 0.99 * sigma.numpy() + 0.01 * ref["sigma_B"], rtol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), steps=st.integers(1, 4))
def test_batch_renorm_with_r_max_1_and_d_max_0_is_bn(seed, steps):
    brn = bnlab.BatchRenorm1d(3, dtype=torch.float64, r_max=1.0, d_max=0.0, momentum=0.1)
    bn = bnlab.BatchNorm1d(3, dtype=torch.float64, momentum=0.1)
    for step in range(steps):
        x, dy = data((5, 3, 2), seed + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = brn(xa), bn(xb)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)


def test_batch_renorm_with_momentum_none_averages_every_batch_equally():
    """momentum=None, BN's cumulative average, is accepted by the constructor: the first forward
    used to fail inside lerp_ on None."""
    layer = bnlab.BatchRenorm1d(2, dtype=torch.float64, momentum=None)
    sigmas = []
    for seed in range(3):
        x = data((6, 2), seed)[0] * (seed + 1)
        layer(x)
        sigmas.append(torch.sqrt(x.var(0, unbiased=False) + layer.eps))
    torch.testing.assert_close(layer.running_std, torch.stack(sigmas).mean(0), rtol=1e-12, atol=0)
    assert int(layer.num_batches_tracked) == 3


def test_batch_renorm_inference_and_non_finite_guard():
    layer = bnlab.BatchRenorm1d(2, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([1.0, -1.0]))
        layer.running_std.copy_(torch.tensor([2.0, 0.5]))
    x = torch.tensor([[3.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(layer.eval()(x), (x - layer.running_mean) / layer.running_std)
    layer.train()
    bad = torch.randn(4, 2, dtype=torch.float64)
    bad[0, 0] = float("inf")
    before = layer.running_std.clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(bad)
    assert torch.equal(layer.running_std, before) and int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("source", [torch.nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_a_bn_checkpoint_loads_into_batch_renorm_with_bns_inference(source):
    """Switching a trained model's BN to Batch Renorm for small batches: the BN state_dict loads
    (sigma = sqrt(running_var + eps)) and inference outputs stay BN's."""
    bn = source(3, momentum=0.5, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    for seed in range(3):
        bn(data((8, 3, 4, 4), seed)[0] * (seed + 1))
    renorm = bnlab.BatchRenorm2d(3, eps=1e-3, dtype=torch.float64)
    renorm.load_state_dict(bn.state_dict())
    assert int(renorm.num_batches_tracked) == 3
    x = data((2, 3, 4, 4), seed=7)[0]
    torch.testing.assert_close(renorm.eval()(x), bn.eval()(x), rtol=1e-12, atol=1e-12)


def random_affine_(layer, generator):
    """gamma from [0.5, 1.5) and beta from [-1, 1) drawn into an affine layer; returns copies as NumPy
    arrays (ones and zeros for a layer without them)."""
    if layer.weight is None:
        return np.ones(layer.num_features), np.zeros(layer.num_features)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator), layer.bias.uniform_(-1, 1, generator=generator)
    return layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()


def paper_limits(t, r_max, d_max, warmup, r_max_steps, d_max_steps):
    """Ioffe 2017's schedule at step t (from 0), written out: (1, 0) for the first ``warmup`` steps,
    then linear to (r_max, d_max) at steps ``r_max_steps`` and ``d_max_steps``, constant after (at
    once where such a step is not past the warm-up)."""
    if t < warmup:
        return 1.0, 0.0
    share = lambda end: 1.0 if end <= warmup else min(1.0, (t - warmup) / (end - warmup))  # noqa: E731
    return 1 + (r_max - 1) * share(r_max_steps), d_max * share(d_max_steps)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_batch_renorm_follows_the_papers_schedule_and_moving_averages_over_a_run(data):
    """Keras' way: over a training run every moving statistic is recomputed by hand in NumPy.
    Random rank, sizes, limits and their schedule, momentum (a rate or None), affine flag; each
    step's output is the reference's with the limits of the schedule at that step and the moving
    averages kept here; the input's gradient is BN's of dy * gamma * r; gamma's and beta's are
    sum dy * x_hat and sum dy."""
    draw = data.draw
    rank, c = draw(st.integers(2, 5)), draw(st.integers(1, 4))
    shape = (draw(st.integers(2, 5)), c, *(draw(st.integers(1, 3)) for _ in range(rank - 2)))
    r_max, d_max = draw(st.floats(1.0, 3.0)), draw(st.floats(0.0, 2.0))
    warmup = draw(st.integers(0, 3))
    ends = draw(st.integers(warmup, warmup + 5)), draw(st.integers(warmup, warmup + 5))
    momentum, affine = draw(st.sampled_from([0.01, 0.3, None])), draw(st.booleans())
    cls = {2: bnlab.BatchRenorm1d, 3: bnlab.BatchRenorm1d, 4: bnlab.BatchRenorm2d, 5: bnlab.BatchRenorm3d}[rank]
    layer = cls(c, momentum=momentum, affine=affine, dtype=torch.float64, r_max=r_max, d_max=d_max, warmup=warmup,
                r_max_steps=ends[0], d_max_steps=ends[1])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    gamma, beta = random_affine_(layer, g)
    mu, sigma = np.zeros(c), np.ones(c)
    for t in range(9):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (1 + (2 * t) % 3) + (t - 4)  # (r and d clip)
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(dy)
        ref = R.batch_renorm_train(x.numpy(), gamma, beta, mu, sigma, *paper_limits(t, r_max, d_max, warmup, *ends))
        torch.testing.assert_close(y.detach().numpy(), ref["y"], rtol=1e-10, atol=1e-12, msg=f"output at step {t}")
        view = (1, c) + (1,) * (rank - 2)
        xb = x.clone().requires_grad_()
        torch.nn.functional.batch_norm(xb, None, None, training=True).backward(
            dy * torch.from_numpy(gamma * ref["r"]).view(view))
        torch.testing.assert_close(xr.grad, xb.grad, rtol=1e-9, atol=1e-12, msg=f"input gradient at step {t}")
        if affine:
            x_hat = (ref["y"] - beta.reshape(view)) / gamma.reshape(view)
            reduced = (0, *range(2, rank))
            torch.testing.assert_close(layer.weight.grad.numpy(), (dy.numpy() * x_hat).sum(reduced), rtol=1e-9,
                                       atol=1e-12)
            torch.testing.assert_close(layer.bias.grad.numpy(), dy.numpy().sum(reduced), rtol=1e-9, atol=1e-12)
            layer.weight.grad, layer.bias.grad = None, None
        rate = 1 / (t + 1) if momentum is None else momentum
        mu, sigma = mu + rate * (ref["mu_B"] - mu), sigma + rate * (ref["sigma_B"] - sigma)
        torch.testing.assert_close(layer.running_mean.numpy(), mu, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_std.numpy(), sigma, rtol=1e-12, atol=1e-14)
        assert int(layer.num_batches_tracked) == t + 1
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    expected = gamma.reshape(view) * (x.numpy() - mu.reshape(view)) / sigma.reshape(view) + beta.reshape(view)
    torch.testing.assert_close(layer.eval()(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, vbs", [((10, 3), 4), ((6, 2, 3, 3), 2), ((8, 3, 5), 8)])
def test_ghost_bn_matches_reference_and_running_stats_average_the_ghost_batches(shape, vbs):
    x, dy = data(shape)
    layer = (bnlab.GhostBatchNorm2d if len(shape) == 4 else bnlab.GhostBatchNorm1d)(
        shape[1], virtual_batch_size=vbs, momentum=1.0, dtype=torch.float64)
    y = layer(x)
    ref = R.ghost_batch_norm_train(x.numpy(), np.ones(shape[1]), np.zeros(shape[1]), vbs)
    assert rel_err(y, ref["y"]) < 1e-10
    unbiased = [v * m / (m - 1) for v, m in zip(ref["sigma2_B"], ref["m"])]
    np.testing.assert_allclose(layer.running_mean.numpy(), ref["mu_B"].mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), np.mean(unbiased, axis=0), rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_ghost_bn_over_a_run_follows_the_reference_chunk_by_chunk(data):
    """Over a training run with random rank, sizes, virtual batch size (a last chunk smaller or not),
    momentum (a rate or None) and affine flag: each step's output is the reference's, the input's
    gradient each chunk's BN backward alone, and the running statistics (recomputed by hand) fold
    in the chunks' average mean and unbiased variance once per step."""
    draw = data.draw
    rank, c, vbs = draw(st.integers(2, 4)), draw(st.integers(1, 3)), draw(st.integers(2, 4))
    spatial = tuple(draw(st.integers(1, 3)) for _ in range(rank - 2))
    n = draw(st.integers(vbs, 3 * vbs).filter(lambda n: n % vbs != 1 or spatial and np.prod(spatial) > 1))
    momentum, affine = draw(st.sampled_from([0.1, 0.5, None])), draw(st.booleans())
    cls = bnlab.GhostBatchNorm1d if rank < 4 else bnlab.GhostBatchNorm2d
    layer = cls(c, virtual_batch_size=vbs, momentum=momentum, affine=affine, dtype=torch.float64)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    gamma, beta = random_affine_(layer, g)
    mean, var = np.zeros(c), np.ones(c)
    view = (1, c) + (1,) * (rank - 2)
    for t in range(5):
        x = torch.randn((n, c, *spatial), generator=g, dtype=torch.float64) * (1 + t) + t
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(dy)
        ref = R.ghost_batch_norm_train(x.numpy(), gamma, beta, vbs, layer.eps)
        torch.testing.assert_close(y.detach().numpy(), ref["y"], rtol=1e-10, atol=1e-12, msg=f"output at step {t}")
        expected = []
        for chunk, dy_chunk in zip(x.split(vbs), dy.split(vbs)):
            chunk = chunk.clone().requires_grad_()
            torch.nn.functional.batch_norm(chunk, None, None, training=True, eps=layer.eps).backward(
                dy_chunk * torch.from_numpy(gamma).view(view))
            expected.append(chunk.grad)
        torch.testing.assert_close(xr.grad, torch.cat(expected), rtol=1e-9, atol=1e-12, msg=f"gradient at step {t}")
        rate = 1 / (t + 1) if momentum is None else momentum
        unbiased = [v * m / (m - 1) for v, m in zip(ref["sigma2_B"], ref["m"])]
        mean = mean + rate * (ref["mu_B"].mean(0) - mean)
        var = var + rate * (np.mean(unbiased, axis=0) - var)
        torch.testing.assert_close(layer.running_mean.numpy(), mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var.numpy(), var, rtol=1e-12, atol=1e-14)


def test_ghost_bn_inference_uses_running_stats_not_virtual_batches():
    layer = bnlab.GhostBatchNorm1d(3, virtual_batch_size=2, dtype=torch.float64)
    layer(data((8, 3))[0])
    layer.eval()
    x = data((6, 3), 1)[0]
    torch.testing.assert_close(layer(x), torch.cat([layer(x[i : i + 1]) for i in range(6)]))
    expected = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)


def test_ghost_bn_with_one_virtual_batch_is_bn_and_tiny_ghost_batches_are_refused():
    x, _ = data((6, 3))
    torch.testing.assert_close(bnlab.GhostBatchNorm1d(3, virtual_batch_size=6, dtype=torch.float64)(x),
                               bnlab.BatchNorm1d(3, dtype=torch.float64)(x))
    with pytest.raises(ValueError, match=r"a batch of 5 in virtual batches of 4 leaves a last virtual batch of 1 "
                                         r"example.*drop_last=True"):
        bnlab.GhostBatchNorm1d(3, virtual_batch_size=4)(torch.randn(5, 3))  # the last ghost batch has 1 row
    with pytest.raises(ValueError, match="virtual batch.*more than one value"):
        bnlab.GhostBatchNorm1d(3, virtual_batch_size=1)(torch.randn(4, 3))  # every ghost batch has 1 row
    assert bnlab.GhostBatchNorm2d(3, virtual_batch_size=4)(torch.randn(5, 3, 2, 1)).isfinite().all()  # 2 values
