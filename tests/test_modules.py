"""bnlab.BatchNorm* against torch.nn.BatchNorm* and the paper's Algorithm 2, plus bad inputs."""

import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import bnlab
from bnlab import reference as R

DOUBLE = torch.float64
PAIRS = {2: (bnlab.BatchNorm1d, nn.BatchNorm1d), 3: (bnlab.BatchNorm1d, nn.BatchNorm1d),
         4: (bnlab.BatchNorm2d, nn.BatchNorm2d), 5: (bnlab.BatchNorm3d, nn.BatchNorm3d)}


def twin_layers(rank, c, backend="auto", **kw):
    ours_cls, torch_cls = PAIRS[rank]
    theirs = torch_cls(c, dtype=torch.float64, **kw)
    ours = ours_cls(c, dtype=torch.float64, backend=backend, **kw)
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


shapes = st.integers(2, 5).flatmap(
    lambda rank: st.tuples(st.integers(2, 6), st.integers(1, 5), *[st.integers(1, 4)] * (rank - 2))
)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, backend=st.sampled_from(["native", "autograd", "fused"]),
       momentum=st.sampled_from([0.1, 0.5, None]), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_equals_torch_nn_over_random_shapes(shape, backend, momentum, affine, seed):
    ours, theirs = twin_layers(len(shape), shape[1], backend, momentum=momentum, affine=affine)
    g = torch.Generator().manual_seed(seed)
    for step in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (step + 1) + step
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yt = ours(xo), theirs(xt)
        yo.backward(dy), yt.backward(dy)
        torch.testing.assert_close(yo, yt, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-9, atol=1e-9)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-9, atol=1e-9)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-10, atol=1e-12)
    ours.eval(), theirs.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def _layouts(x: torch.Tensor):
    """x as a model may hand it over: contiguous, channels_last, a transposed view, a strided slice."""
    yield x
    if x.dim() == 4:
        yield x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 3:
        yield x.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield torch.cat([x, x]).flip(0)[::2]


LIKE_TORCH_BN = {  # bnlab layers that are torch's BN (+ ReLU), given rank and keyword arguments
    "BatchNorm": lambda rank, **kw: {2: bnlab.BatchNorm1d, 3: bnlab.BatchNorm1d, 4: bnlab.BatchNorm2d,
                                     5: bnlab.BatchNorm3d}[rank](3, **kw),
    "BatchNormAct, relu": lambda rank, **kw: (bnlab.BatchNormAct1d if rank < 4 else bnlab.BatchNormAct2d)(3, **kw),
    "GhostBatchNorm, one virtual batch": lambda rank, **kw: (bnlab.GhostBatchNorm1d if rank < 4 else
                                                             bnlab.GhostBatchNorm2d)(3, virtual_batch_size=64, **kw),
    "SyncBatchNorm, no process group": lambda rank, **kw: bnlab.SyncBatchNorm(3, **kw),
}


@pytest.mark.parametrize("kind", LIKE_TORCH_BN)
@pytest.mark.parametrize("backend", ["auto", "native", "autograd", "fused"])
def test_every_configuration_and_input_layout_equals_torch_nn(kind, backend):
    """affine or not, running statistics or not, EMA or cumulative, in ranks 2-5 (those with no 3d: 2-4)
    and four memory layouts: outputs, input and parameter gradients and running statistics over two
    training steps, then eval. (momentum=None with track_running_stats=False raised a TypeError in
    every layer until 2026-11-24: the cumulative average's weight read a count that is not kept.)"""
    g = torch.Generator().manual_seed(0)
    for rank in (2, 3, 4, 5) if kind in ("BatchNorm", "SyncBatchNorm, no process group") else (2, 3, 4):
        x0 = torch.randn((5, 3, 4, 3, 2)[:rank], generator=g, dtype=DOUBLE) * 2 + 1
        for affine, track, momentum in itertools.product((True, False), (True, False), (0.1, None)):
            kw = dict(affine=affine, track_running_stats=track, momentum=momentum, dtype=DOUBLE)
            for x in _layouts(x0):
                ours = LIKE_TORCH_BN[kind](rank, backend=backend, **kw)
                theirs = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank](3, **kw)
                if affine:
                    with torch.no_grad():
                        theirs.weight.uniform_(0.5, 1.5, generator=g)
                        theirs.bias.uniform_(-1, 1, generator=g)
                ours.load_state_dict(theirs.state_dict())
                for training in (True, True, False):
                    ours.train(training), theirs.train(training)
                    xo, xt = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
                    yo, yt = ours(xo), theirs(xt)
                    yt = yt.relu() if kind == "BatchNormAct, relu" else yt
                    dy = torch.randn(yt.shape, generator=g, dtype=DOUBLE)
                    yo.backward(dy), yt.backward(dy)
                    where = f"rank {rank}, {kw}, training={training}, strides {x.stride()}"
                    torch.testing.assert_close(yo, yt, rtol=1e-10, atol=1e-10, msg=where)
                    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-9, atol=1e-9, msg=where)
                for key, value in theirs.state_dict().items():
                    torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=where)
                if affine:
                    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-9, msg=where)


def test_functional_momentum_none_is_fine_without_running_statistics_and_explained_with_them():
    x = torch.randn(6, 3, dtype=DOUBLE)
    torch.testing.assert_close(bnlab.functional.batch_norm(x, None, None, training=True, momentum=None),
                               nn.functional.batch_norm(x, None, None, training=True))
    with pytest.raises(ValueError, match=r"got None \(the cumulative average needs the batch count"):
        bnlab.functional.batch_norm(x, torch.zeros(3, dtype=DOUBLE), torch.ones(3, dtype=DOUBLE), training=True,
                                    momentum=None)


def test_state_dict_round_trips_both_ways():
    theirs = nn.BatchNorm2d(4)
    theirs.train()(torch.randn(8, 4, 3, 3) * 2 + 1)
    ours = bnlab.BatchNorm2d(4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 1


@pytest.mark.parametrize("kind", [bnlab.BatchNorm1d, bnlab.BatchNormAct1d, bnlab.GhostBatchNorm1d, bnlab.BatchRenorm1d,
                                  bnlab.CrossIterationBatchNorm1d, bnlab.SyncBatchNorm])
def test_old_checkpoint_without_num_batches_tracked_loads(kind):
    """torch < 0.4.1 saved no num_batches_tracked; torch's BN loads such a checkpoint strictly, with
    the count at 0, and so does every bnlab layer (Batch Renorm refused it until 2026-11-24), with
    torch's inference outputs."""
    torch.manual_seed(0)
    theirs = nn.BatchNorm1d(3, dtype=torch.float64)
    theirs(torch.randn(8, 3, dtype=torch.float64) * 2 + 1)
    state = {k: v for k, v in theirs.state_dict().items() if k != "num_batches_tracked"}
    layer = kind(3, dtype=torch.float64)
    if kind is bnlab.BatchNormAct1d:
        layer = kind(3, act="identity", dtype=torch.float64)
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 0
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(layer.eval()(x), theirs.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", [bnlab.BatchNorm1d, bnlab.BatchNormAct1d, bnlab.GhostBatchNorm1d, bnlab.BatchRenorm1d,
                                  bnlab.CrossIterationBatchNorm1d, bnlab.SyncBatchNorm])
def test_num_batches_tracked_is_filled_in_only_for_checkpoints_older_than_it(kind):
    """As torch's BN: a checkpoint of version 2 on (torch's state_dict, bnlab's) that lacks
    num_batches_tracked lacks a key (under momentum=None the count weighs the running statistics,
    so a count of 0 would let the next batch overwrite them); an older one is filled in with the
    layer's own count, not 0. Until 2026-11-25 bnlab filled in 0 for every checkpoint."""
    theirs = nn.BatchNorm1d(3, momentum=None)
    theirs(torch.randn(8, 3))
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    layer = kind(3, momentum=None, **({"act": "identity"} if kind is bnlab.BatchNormAct1d else {}))
    layer.num_batches_tracked.fill_(2)  # (as after two batches)
    for module in (nn.BatchNorm1d(3, momentum=None), layer):
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            module.load_state_dict(state)
    assert layer.load_state_dict(state, strict=False).missing_keys == ["num_batches_tracked"]
    assert bnlab.BatchNorm1d(3).state_dict()._metadata[""]["version"] == 2
    state._metadata[""]["version"] = 1  # torch < 0.4.1's layout
    layer.load_state_dict(state)
    assert int(layer.num_batches_tracked) == 2
    torch.testing.assert_close(layer.running_mean, theirs.running_mean)


def test_cumulative_stats_is_the_equal_weight_average():
    layer = bnlab.BatchNorm1d(3, stats="cumulative", dtype=torch.float64)
    assert bnlab.BatchNorm1d(3, momentum=None).stats == "cumulative"
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(10, 3, generator=g, dtype=torch.float64) * (i + 1) for i in range(4)]
    for x in batches:
        layer(x)
    mu = [x.numpy().mean(0) for x in batches]
    var = [x.numpy().var(0) for x in batches]
    E_x, Var_x = R.population_statistics(mu, var, m=10)
    np.testing.assert_allclose(layer.running_mean.numpy(), E_x, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), Var_x, rtol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "autograd", "fused"])
def test_non_finite_batch_does_not_poison_running_stats_and_warns_with_layer_name(backend):
    net = bnlab.name_layers(nn.Sequential(nn.Linear(3, 4), bnlab.BatchNorm1d(4, backend=backend)))
    net(torch.randn(8, 3))
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="'1'.*non-finite"):
        net(bad)
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, before[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(8, 3))
    assert int(net[1].num_batches_tracked) == 2


@pytest.mark.parametrize("backend", ["auto", "autograd", "fused"])
def test_a_finite_batch_whose_variance_overflows_is_left_out_and_the_warning_says_so(backend):
    """Values near 1e20 are finite in float32, but their variance (1e40) is not: the batch is left
    out of the running statistics as a NaN batch is, and the warning no longer says the input held
    NaN or inf."""
    layer = bnlab.BatchNorm1d(2, backend=backend)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    huge = torch.tensor([[1e20, 1.0], [-1e20, 2.0], [3e19, 3.0]])
    with pytest.warns(RuntimeWarning, match="non-finite batch statistics.*a variance beyond the running statistics'"):
        layer(huge)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def _paired(window, burn_in, backend="auto"):
    net = bnlab.cross_iteration(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), window, burn_in)
    net[1].backend = backend
    return net


NON_FINITE_LAYERS = {
    "bn": lambda: bnlab.BatchNorm2d(3),
    "bn-act": lambda: bnlab.BatchNormAct2d(3),  # (small: BN on torch's kernel, then the activation)
    "bn-act-fused": lambda: bnlab.BatchNormAct2d(3, backend="fused"),
    "bn-act on the Triton kernels (interpreted)": lambda: bnlab.BatchNormAct2d(3, backend="triton"),
    "ghost": lambda: bnlab.GhostBatchNorm2d(3, virtual_batch_size=2),
    "batch-renorm": lambda: bnlab.BatchRenorm2d(3),
    "sync (no process group)": lambda: bnlab.SyncBatchNorm(3),
    "cross-iteration, burn-in": lambda: _paired(2, burn_in=10),
    "cross-iteration, pooling": lambda: _paired(2, burn_in=0),
    "cross-iteration on torch ops, burn-in": lambda: _paired(2, 10, "native"),
}


@pytest.mark.parametrize("name", NON_FINITE_LAYERS)
def test_a_non_finite_batch_backpropagates_like_torch_and_leaves_the_buffers(name):
    """A NaN batch gives NaN gradients, as torch's BN does (so torch.amp.GradScaler can skip the
    step), and leaves the buffers as they were. Before, BN on torch's kernel undid the kernel's
    update in the buffers the kernel had saved for its backward, and backward() raised autograd's
    in-place error instead."""
    torch.manual_seed(0)
    layer = NON_FINITE_LAYERS[name]()
    layer(torch.randn(4, 3, 2, 2)).sum().backward()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 0, 0, 0] = float("nan")
    bad.requires_grad_()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = layer(bad)
    y.sum().backward()
    assert bad.grad[:, 0].isnan().any()
    for key, value in layer.state_dict().items():
        if not key.endswith("iteration"):  # (cross-iteration BN counts the step, as its burn-in's clock)
            assert torch.equal(value, before[key]), key
    layer(torch.randn(4, 3, 2, 2)).sum().backward()  # and training goes on


def test_grad_scaler_skips_an_overflowing_step_and_the_running_statistics_stay_finite():
    """Mixed precision's usual overflow: an inf batch. GradScaler skips the step (its scale halves)
    and bnlab's running statistics stay as they were; torch's BN folds the inf in for good."""
    def train(norm):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        opt, scaler = torch.optim.SGD(net.parameters(), lr=0.1), torch.amp.GradScaler("cpu")
        for step in range(3):
            x = torch.randn(4, 3, 6, 6)
            if step == 1:
                x[0, 0, 0, 0] = float("inf")
                before = net[1].running_mean.clone()
            with torch.autocast("cpu", dtype=torch.float16), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = net(x).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if step == 1:
                assert scaler.get_scale() == 2.0**15  # (from 2^16: the step was skipped)
                kept = torch.equal(net[1].running_mean, before)
        return kept, bool(net[1].running_mean.isfinite().all())

    assert train(bnlab.BatchNorm2d(4)) == (True, True)
    assert train(nn.BatchNorm2d(4)) == (False, False)


@pytest.mark.parametrize("layer", [bnlab.BatchNorm2d, bnlab.BatchRenorm2d])
def test_loading_running_statistics_poisoned_by_torch_warns_at_the_users_line(layer):
    """torch's BN folds a NaN batch into its running statistics for good; a checkpoint saved after
    it gives NaN in every inference. Loading one says so, naming the layer and the channels."""
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    source(x)
    target = nn.Sequential(nn.Conv2d(3, 4, 1), layer(4))
    with pytest.warns(RuntimeWarning, match=r"'1': the checkpoint's running_mean at 4 channel\(s\) \(0, 1, 2, 3\).*"
                                            r"recalibrate") as caught:
        target.load_state_dict(source.state_dict())
    assert caught[0].filename == __file__  # (the user's line, not torch's recursion or bnlab's)
    assert not torch.isfinite(target[1].running_mean).any()  # loaded all the same: recalibrate can mend it
    clean = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    clean(torch.randn(4, 3, 2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(clean.state_dict())


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (bnlab.BatchNorm1d(3), torch.randn(1, 3), "more than one value per channel.*eval\\(\\).*GroupNorm"),
        (bnlab.BatchNorm2d(3), torch.randn(1, 3, 1, 1), "more than one value per channel"),
        # (no running statistics: batch statistics in eval() too, where one example came out as beta)
        (bnlab.BatchNorm1d(3, track_running_stats=False).eval(), torch.randn(1, 3),
         "track_running_stats=False.*batch statistics in eval\\(\\) too.*more than one value"),
        # (cross-iteration BN pools batch statistics too: the message must not suggest it)
        (bnlab.CrossIterationBatchNorm1d(3), torch.randn(1, 3), "(?s)^(?!.*BatchNorm\\*).*more than one value"),
        (bnlab.BatchNorm2d(3), torch.randn(4, 5, 2, 2), "expected 3 channels.*got 5"),
        (bnlab.BatchNorm2d(3), torch.randn(4, 3, 2), "expected 4D input, got 3D"),
        (bnlab.BatchNorm1d(3), torch.randn(4, 3, 2, 2), "expected 2D or 3D input"),
    ],
)
def test_bad_inputs_raise_errors_that_say_what_to_do(layer, x, message):
    with pytest.raises(ValueError, match=message):
        layer(x)


@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm2d(3), lambda: bnlab.BatchNormAct2d(3),
                                  lambda: bnlab.GhostBatchNorm2d(3), lambda: bnlab.BatchRenorm2d(3),
                                  lambda: bnlab.SyncBatchNorm(3), lambda: bnlab.CrossIterationBatchNorm2d(3)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.complex64])
def test_a_non_floating_input_is_refused_with_its_dtype(make, dtype):
    """(torch's kernel said '"batch_norm" not implemented for 'Byte'', or a later op failed)"""
    x = torch.randint(0, 255, (4, 3, 2, 2)).to(dtype)
    for layer in (make(), make().eval()):
        with pytest.raises(TypeError, match=f"floating-point input.*got {dtype}"):
            layer(x)
    with pytest.raises(TypeError, match="floating-point input"):
        bnlab.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)


@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm2d(3), lambda: bnlab.BatchNormAct2d(3),
                                  lambda: bnlab.GhostBatchNorm2d(3, virtual_batch_size=2),
                                  lambda: bnlab.BatchRenorm2d(3), lambda: bnlab.SyncBatchNorm(3),
                                  lambda: bnlab.BatchNorm2d(3, affine=False)])
def test_an_input_in_another_dtype_than_the_layer_is_refused_alike_in_training_and_eval(make):
    """(SyncBatchNorm trained on a float32 batch in a float64 layer and failed in eval() on torch's
    'mixed dtype (CPU)', Batch Renorm took it in both modes, the other layers failed in both)"""
    for layer_dtype, x_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64),
                                 (torch.float64, torch.float16), (torch.bfloat16, torch.float16)):
        x = torch.randn(4, 3, 2, 2).to(x_dtype)
        for layer in (make().to(layer_dtype), make().to(layer_dtype).eval()):
            with pytest.raises(TypeError, match=f"input is {x_dtype}, the layer's .* {layer_dtype}; convert"):
                layer(x)
    for x_dtype in (torch.bfloat16, torch.float16):  # autocast's: low-precision input, float32 state
        x = torch.randn(4, 3, 2, 2)
        for layer in (make(), make().eval()):
            y = layer(x.to(x_dtype))
            assert y.dtype == x_dtype
            assert torch.allclose(y.float(), make().train(layer.training)(x), atol=0.05)
    with pytest.raises(TypeError, match="input is torch.float32, the layer's .* torch.float64"):
        bnlab.functional.batch_norm(torch.randn(4, 3), torch.zeros(3, dtype=torch.float64),
                                    torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: bnlab.BatchNorm1d(3), (0, 3)),
        (lambda: bnlab.BatchNorm2d(3, backend="autograd"), (0, 3, 2, 2)),
        (lambda: bnlab.BatchNormAct2d(3), (0, 3, 2, 2)),
        (lambda: bnlab.BatchRenorm2d(3, warmup=0), (0, 3, 2, 2)),
        (lambda: bnlab.GhostBatchNorm2d(3, virtual_batch_size=2), (0, 3, 2, 2)),
        (lambda: bnlab.SyncBatchNorm(3), (0, 3, 2, 2)),  # (no process group: the whole group is empty)
    ],
)
def test_an_empty_batch_passes_through_training_and_touches_no_statistic(make, shape):
    """torch's convention for detection heads with no boxes: an empty output, on the graph. Unlike
    torch, nothing is counted either (torch adds 1 to num_batches_tracked)."""
    layer = make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(layer.weight.grad, torch.zeros(3))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    y = layer(torch.randn((4, *shape[1:])))  # the next real batch is folded in as the first
    assert int(layer.num_batches_tracked) == 1


def test_an_empty_batch_between_two_leaves_cross_iteration_bn_where_it_was():
    conv = nn.Conv2d(2, 3, 3)
    cbn = bnlab.CrossIterationBatchNorm2d(3, window=3).pair(conv)
    cbn(conv(torch.randn(4, 2, 5, 5)))
    state = {k: v.clone() for k, v in cbn.state_dict().items()}
    assert cbn(conv(torch.randn(0, 2, 5, 5))).shape == (0, 3, 3, 3)
    for key, value in cbn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert bnlab.functional.batch_norm(torch.randn(0, 3), None, None, training=True).shape == (0, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: bnlab.BatchNorm2d(0), "num_features must be at least 1"),
        (lambda: bnlab.BatchNorm2d(3, eps=-1e-5), "eps must be 0 or more"),
        (lambda: bnlab.BatchRenorm2d(3, r_max=0.5), "r_max >= 1 and d_max >= 0"),
        (lambda: bnlab.BatchRenorm2d(3, d_max=-1.0), "r_max >= 1 and d_max >= 0"),
        (lambda: bnlab.BatchRenorm2d(3, track_running_stats=False), "keeps them \\(track_running_stats=True\\)"),
        (lambda: bnlab.CrossIterationBatchNorm2d(3, burn_in=-1), "burn_in must be 0 or more"),
    ],
)
def test_settings_that_make_no_sense_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layer, torch_layer", [(bnlab.BatchNorm2d, nn.BatchNorm2d),
                                                (bnlab.BatchRenorm2d, nn.BatchNorm2d),
                                                (bnlab.SyncBatchNorm, nn.SyncBatchNorm)])
def test_the_layers_take_torch_nn_batch_norms_arguments_in_its_order(layer, torch_layer):
    """(num_features, eps, momentum, affine, track_running_stats, then SyncBatchNorm's process_group,
    device, dtype): a call written for torch's layer with positional arguments means the same with
    bnlab's (Batch Renorm took device in track_running_stats' place until 2026-11-24). Ghost BN and
    BatchNormAct take their own argument second (virtual_batch_size, act)."""
    args = (3, 1e-3, 0.2, True, True, *((None,) if torch_layer is nn.SyncBatchNorm else ()), "cpu", torch.float64)
    ours, theirs = layer(*args), torch_layer(*args)
    for name in ("eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.weight.dtype == theirs.weight.dtype == torch.float64


def test_one_example_is_fine_in_eval_mode():
    layer = bnlab.BatchNorm2d(3).eval()
    y = layer(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(y, torch.ones(1, 3, 1, 1) / np.sqrt(1 + 1e-5))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stats"):
        bnlab.BatchNorm1d(3, stats="median")
    with pytest.raises(ValueError, match="momentum"):
        bnlab.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="backend"):
        bnlab.BatchNorm1d(3, backend="fast")


def test_recalibrate_is_algorithm2_by_hand():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), bnlab.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3),
                        nn.BatchNorm1d(3)).double()
    net.eval()
    batches = [torch.randn(7, 4, dtype=torch.float64) for _ in range(5)]
    weights_before = {k: v.clone() for k, v in net.state_dict().items()}
    bnlab.recalibrate(net, batches)
    # By hand: the training-mode network (BN on batch statistics, dropout off), layer by layer.
    mu1, var1, mu2, var2 = [], [], [], []
    W1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    W2, b2 = net[3].weight.detach().numpy(), net[3].bias.detach().numpy()
    g1, be1 = net[1].weight.detach().numpy(), net[1].bias.detach().numpy()
    for x in batches:
        h = x.numpy() @ W1.T + b1
        out = R.batch_norm_train(h, g1, be1)
        mu1.append(out["mu_B"]), var1.append(out["sigma2_B"])
        h2 = out["y"] @ W2.T + b2
        mu2.append(h2.mean(0)), var2.append(h2.var(0))
    for layer, mu, var in [(net[1], mu1, var1), (net[4], mu2, var2)]:
        E_x, Var_x = R.population_statistics(mu, var, m=7)
        np.testing.assert_allclose(layer.running_mean.numpy(), E_x, rtol=1e-10)
        np.testing.assert_allclose(layer.running_var.numpy(), Var_x, rtol=1e-10)
    assert not net.training and not net[1].training  # modes restored
    for key, value in net.state_dict().items():
        if "running" not in key:
            assert torch.equal(value, weights_before[key]), key


def test_recalibrate_does_for_bnlab_layers_what_swa_update_bn_does_for_torchs():
    """torch.optim.swa_utils.update_bn looks for torch's BN classes only: on a model of bnlab's
    layers it returns without running a batch, leaving the averaged model with the running
    statistics of the weights it was copied at. bnlab.recalibrate of the averaged model gives the
    running statistics update_bn gives the same model with torch's layers."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3),
                        bnlab.BatchNorm1d(3))
    averaged = AveragedModel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        net(torch.randn(8, 2, 6, 6)).square().mean().backward()
        optimizer.step()
        averaged.update_parameters(net)
    loader = [(torch.randn(8, 2, 6, 6) * 2 + 1, torch.zeros(8)) for _ in range(5)]
    state = copy.deepcopy(averaged.state_dict())
    update_bn(loader, averaged)
    for key, value in averaged.state_dict().items():
        assert torch.equal(value, state[key]), key  # (nothing done: the trap the README names)
    twin = bnlab.to_torch(copy.deepcopy(averaged))
    update_bn(loader, twin)
    bnlab.recalibrate(averaged, (x for x, _ in loader))
    for index in (1, 5):
        ours, theirs = averaged.module[index], twin.module[index]
        assert isinstance(theirs, nn.modules.batchnorm._BatchNorm)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert not torch.allclose(ours.running_var, state[f"module.{index}.running_var"])


def test_recalibrate_needs_a_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        bnlab.recalibrate(nn.Sequential(bnlab.BatchNorm1d(2)), [])


@pytest.mark.parametrize("norm", [lambda: nn.GroupNorm(2, 4), lambda: bnlab.BatchRenorm1d(4),
                                  lambda: bnlab.BatchNorm1d(4, track_running_stats=False)])
def test_recalibrate_says_when_a_model_has_nothing_to_recalibrate(norm):
    """Before, it ran every batch through the model and changed nothing, silently."""
    net = nn.Sequential(nn.Linear(3, 4), norm())
    state = copy.deepcopy(net.state_dict())

    def batches():
        raise AssertionError("no batch should run")
        yield

    with pytest.warns(UserWarning, match="Sequential has no batch-norm layer with running statistics.*no batch"):
        assert bnlab.recalibrate(net, batches()) is net
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.filterwarnings("ignore:.*non-finite batch statistics:RuntimeWarning")  # (the layer's own, tested apart)
@pytest.mark.parametrize("layer", [bnlab.BatchNorm1d, nn.BatchNorm1d])
def test_recalibrate_leaves_non_finite_batches_out(layer):
    """A NaN or inf batch used to make the population statistics NaN: it is left out, as in
    training, with a warning that counts it; when every batch is, nothing changes."""
    torch.manual_seed(0)
    net = bnlab.name_layers(nn.Sequential(nn.Linear(3, 4), layer(4)))
    good = [torch.randn(6, 3) for _ in range(3)]
    bad = good[1].clone()
    bad[2, 0] = float("nan")
    reference = bnlab.recalibrate(copy.deepcopy(net), good)[1]
    with pytest.warns(UserWarning, match="1 of 4 batches reached '1' with NaN or inf values"):
        bnlab.recalibrate(net, [good[0], bad, *good[1:]])
    torch.testing.assert_close(net[1].running_mean, reference.running_mean)
    torch.testing.assert_close(net[1].running_var, reference.running_var)
    state = copy.deepcopy(net.state_dict())
    inf = good[0].clone()
    inf[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"every batch \(2\) reached '1' with NaN or inf"):
        bnlab.recalibrate(net, [bad, inf])
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_evaluating_uses_running_statistics_and_restores_every_mode():
    torch.manual_seed(2)
    frozen = bnlab.BatchNorm1d(5)  # a layer the user keeps in eval mode on purpose
    net = nn.Sequential(nn.Linear(3, 5), bnlab.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 5), frozen).train()
    net(torch.randn(16, 3))
    frozen.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3)
    with bnlab.evaluating(net) as same:
        assert same is net and not any(m.training for m in net.modules())
        assert not torch.is_grad_enabled()
        y = net(x)
    # Algorithm 2's inference, by hand: the running statistics, dropout off.
    h = net[0](x).detach()
    for bn in (net[1], frozen):
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight.detach() + bn.bias.detach()
        if bn is net[1]:
            h = net[3](h).detach()
    torch.testing.assert_close(y, h)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key  # the test batch touched no running statistics
    assert [m.training for m in net.modules()] == [True, True, True, True, True, False]
    assert torch.is_grad_enabled()


def test_evaluating_restores_the_modes_after_an_error():
    net = nn.Sequential(nn.Linear(3, 4), bnlab.BatchNorm1d(4)).train()
    with pytest.raises(RuntimeError, match="boom"):
        with bnlab.evaluating(net):
            raise RuntimeError("boom")
    assert net.training and net[1].training


def test_convert_swaps_layers_and_keeps_state():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.BatchNorm1d(3, affine=False)))
    net.train()(torch.randn(6, 2, 6, 6))
    net[1].weight.requires_grad_(False)
    net.eval()
    x = torch.randn(3, 2, 6, 6)
    expected = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    converted = bnlab.convert(net)
    assert type(converted[1]) is bnlab.BatchNorm2d and type(converted[3][2]) is bnlab.BatchNorm1d
    assert converted[3][2].name == "3.2"
    assert not converted[1].weight.requires_grad and not converted[1].training
    torch.testing.assert_close(converted(x), expected)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, state[key]), key


CONVERTERS = {"convert": bnlab.convert, "SyncBatchNorm.convert": bnlab.SyncBatchNorm.convert,
              "cross_iteration": lambda model: bnlab.cross_iteration(model, window=3)}


@pytest.mark.parametrize("converter", list(CONVERTERS))
def test_the_converters_keep_a_frozen_parameter_frozen_and_a_pruning_mask(converter):
    """(cross_iteration made a frozen gamma and beta trainable again, as detection fine-tuning freezes
    them; every converter refused a BN pruned with torch.nn.utils.prune, as network slimming prunes
    gammas, with a state_dict error.) The mask goes back on the same parameter, over its unpruned
    values, and the converted layer trains as torch's pruned one in its first step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=DOUBLE), nn.BatchNorm2d(4, dtype=DOUBLE))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    model[1].weight.requires_grad_(False)  # (before pruning: the weight it computes then has no graph to copy)
    prune.l1_unstructured(model[1], "weight", 2)
    twin = copy.deepcopy(model)
    converted = CONVERTERS[converter](model)
    layer = converted[1]
    assert isinstance(layer, bnlab.BatchNorm) and layer is not twin[1]
    assert torch.equal(layer.weight_mask, twin[1].weight_mask) and twin[1].weight_mask.sum() == 2
    assert torch.equal(layer.weight_orig, twin[1].weight_orig) and torch.equal(layer.weight, twin[1].weight)
    assert not layer.weight_orig.requires_grad and layer.bias.requires_grad
    x = torch.randn(4, 3, 6, 6, dtype=DOUBLE)
    y, expected = converted(x), twin(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    expected.backward(g)
    torch.testing.assert_close(layer.bias.grad, twin[1].bias.grad, rtol=1e-10, atol=1e-12)
    assert layer.weight_orig.grad is None
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).requires_grad_(False))  # (no pruning)
    assert not any(p.requires_grad for p in CONVERTERS[converter](frozen)[1].parameters())


@pytest.mark.parametrize("converter", [*CONVERTERS, "to_torch"])
def test_an_optimizer_made_before_a_conversion_still_steps_the_converted_layers(converter):
    """(The converted layers had new parameters: an optimizer made before, which torch's
    convert_sync_batchnorm allows, stepped the old ones and BN's gamma and beta never moved.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), (bnlab.BatchNorm2d if converter == "to_torch" else nn.BatchNorm2d)(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    gamma, beta = model[1].weight, model[1].bias
    for step in range(2):  # (a step before the conversion too: the momentum buffers carry on)
        if step == 1:
            model = bnlab.to_torch(model) if converter == "to_torch" else CONVERTERS[converter](model)
            assert model[1].weight is gamma and model[1].bias is beta
        before = gamma.detach().clone()
        opt.zero_grad()
        model(torch.randn(4, 3, 6, 6)).square().mean().backward()
        opt.step()
        assert (gamma - before).abs().min() > 0


def test_convert_names_the_batch_norms_it_leaves():
    class ScaledBatchNorm(nn.BatchNorm1d):  # a subclass with its own forward: bnlab's would drop it
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.LazyBatchNorm1d(), ScaledBatchNorm(3), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"'0' \(LazyBatchNorm1d\), '1' \(ScaledBatchNorm\)") as caught:
        converted = bnlab.convert(net)
    assert caught[0].filename == __file__  # at the caller's line
    assert type(converted[0]) is nn.LazyBatchNorm1d and type(converted[1]) is ScaledBatchNorm
    assert type(converted[2]) is bnlab.BatchNorm1d
    net[0](torch.randn(4, 3))  # a lazy layer becomes BatchNorm1d at its first forward, then converts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(bnlab.convert(nn.Sequential(net[0]))[0]) is bnlab.BatchNorm1d


TO_TORCH = {  # a producer and a bnlab layer, the input's shape, the layer as a torch-only model defines it
    "BatchNorm2d": (lambda: (nn.Conv2d(2, 3, 3), bnlab.BatchNorm2d(3)), (6, 2, 5, 5), lambda: nn.BatchNorm2d(3)),
    "BatchNorm1d, momentum=None": (lambda: (nn.Linear(2, 3), bnlab.BatchNorm1d(3, momentum=None)), (6, 2),
                                   lambda: nn.BatchNorm1d(3, momentum=None)),
    "BatchNorm3d, no affine": (lambda: (nn.Conv3d(2, 3, 1), bnlab.BatchNorm3d(3, affine=False)), (6, 2, 2, 2, 2),
                               lambda: nn.BatchNorm3d(3, affine=False)),
    "BatchNormAct2d": (lambda: (nn.Conv2d(2, 3, 3), bnlab.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2)),
                       (6, 2, 5, 5), lambda: nn.Sequential(nn.BatchNorm2d(3), nn.LeakyReLU(0.2))),
    "BatchRenorm2d": (lambda: (nn.Conv2d(2, 3, 3), bnlab.BatchRenorm2d(3, warmup=0, r_max_steps=2, d_max_steps=2)),
                      (6, 2, 5, 5), lambda: nn.BatchNorm2d(3, momentum=0.01)),
    "GhostBatchNorm1d": (lambda: (nn.Linear(2, 3), bnlab.GhostBatchNorm1d(3, virtual_batch_size=2)), (6, 2),
                         lambda: nn.BatchNorm1d(3)),
    "SyncBatchNorm": (lambda: (nn.Conv2d(2, 3, 3), bnlab.SyncBatchNorm(3)), (6, 2, 5, 5),
                      lambda: nn.SyncBatchNorm(3)),
    "CrossIterationBatchNorm2d": (lambda: _producer_and(nn.Conv2d(2, 3, 3),
                                                        bnlab.CrossIterationBatchNorm2d(3, window=3)),
                                  (6, 2, 5, 5), lambda: nn.BatchNorm2d(3)),
}


def _producer_and(producer, layer):
    return producer, layer.pair(producer)


@pytest.mark.parametrize("kind", TO_TORCH)
def test_to_torch_gives_torch_nn_layers_with_the_eval_outputs_and_state(kind):
    make, shape, torch_layer = TO_TORCH[kind]
    torch.manual_seed(0)
    producer, layer = make()
    net = nn.Sequential(producer, layer).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):  # running statistics away from their start, r and d away from 1 and 0
        loss = net(torch.randn(*shape, dtype=torch.float64) * 3 + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if layer.affine:
        layer.bias.requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64)
    with bnlab.evaluating(net):
        expected = net(x)
    std = layer.running_std.clone() if kind == "BatchRenorm2d" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing left)
        plain = bnlab.to_torch(net)
    # the model a deployment without bnlab defines: the same modules, and it takes the state_dict as it is
    deployed = nn.Sequential(copy.deepcopy(producer), torch_layer()).double()
    assert [type(m) for m in plain.modules()] == [type(m) for m in deployed.modules()]
    deployed.load_state_dict(plain.state_dict())
    assert not producer._forward_hooks  # (cross-iteration BN's hook gone with the layer)
    assert all(m.training for m in plain.modules())
    norm, twin = (plain[1][0], deployed[1][0]) if kind == "BatchNormAct2d" else (plain[1], deployed[1])
    assert (norm.momentum, norm.eps, int(norm.num_batches_tracked)) == (twin.momentum, layer.eps, 5)
    if layer.affine:
        assert norm.weight.requires_grad and not norm.bias.requires_grad
    if std is not None:  # Batch Renorm's sigma = sqrt(running_var + eps)
        torch.testing.assert_close(norm.running_var, std.square() - layer.eps, rtol=1e-12, atol=0)
    for model in (plain, deployed):
        with bnlab.evaluating(model):
            torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_to_torch_warns_where_batch_renorm_s_sigma_has_no_torch_variance():
    net = nn.Sequential(bnlab.BatchRenorm1d(3, eps=1e-2))
    with torch.no_grad():
        net[0].running_std.copy_(torch.tensor([1.0, 0.1, 0.05]))  # sqrt(eps) = 0.1
    with pytest.warns(UserWarning, match=r"sigma below sqrt\(eps\) in channels \[2\]") as caught:
        plain = bnlab.to_torch(net)
    assert caught[0].filename == __file__  # at the caller's line
    torch.testing.assert_close(plain[0].running_var, torch.tensor([1.0 - 1e-2, 0.0, 0.0]))


def test_to_torch_names_the_layers_it_leaves():
    net = nn.Sequential(nn.Linear(2, 3), bnlab.BatchNorm(3), bnlab.GhostBatchNorm1d(3, track_running_stats=False),
                        bnlab.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"to_torch: left as they were: '1' \(BatchNorm\); a base class"):
        plain = bnlab.to_torch(net)
    assert type(plain[1]) is bnlab.BatchNorm
    x = torch.randn(6, 3)
    for i in (2, 3):  # without running statistics, eval mode normalizes with the whole batch's, as bnlab's
        assert type(plain[i]) is nn.BatchNorm1d and not plain[i].track_running_stats
        torch.testing.assert_close(plain[i].eval()(x), bnlab.GhostBatchNorm1d(
            3, virtual_batch_size=2, track_running_stats=False).eval()(x))


def test_is_batch_norm_takes_every_batch_norm_of_either_library_and_no_other_normalization():
    """bnlab's layers are not torch's ``_BatchNorm`` (an isinstance check on it skips them, as in a
    weight-decay rule); is_batch_norm takes both, and no Group, Layer or Instance Norm."""
    ours = [getattr(bnlab, name)(4) for name in bnlab.__all__
            if isinstance(getattr(bnlab, name), type) and name[-2:] in ("1d", "2d", "3d")] + [bnlab.SyncBatchNorm(4)]
    assert len(ours) == 13
    theirs = [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.LazyBatchNorm2d(), nn.SyncBatchNorm(4)]
    others = [nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4, affine=True), nn.Conv2d(4, 4, 1)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in ours)
    assert [bnlab.is_batch_norm(m) for m in ours + theirs + others] == [True] * 18 + [False] * 4
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bnlab.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2), nn.BatchNorm1d(2))
    model(torch.randn(2, 3, 5, 5))  # (the lazy Linear takes its shape)
    exempt = {id(p) for m in model.modules() if bnlab.is_batch_norm(m) for p in m.parameters()}
    assert [name for name, p in model.named_parameters() if id(p) not in exempt] == ["0.weight", "4.weight",
                                                                                      "4.bias"]


RUNTIME_NO_STATS = {
    "BatchNorm2d": lambda: bnlab.BatchNorm2d(4), "fused": lambda: bnlab.BatchNorm2d(4, backend="fused"),
    "BatchNormAct2d": lambda: bnlab.BatchNormAct2d(4, act="identity"),
    "GhostBatchNorm2d": lambda: bnlab.GhostBatchNorm2d(4, virtual_batch_size=6),
    "SyncBatchNorm": lambda: bnlab.SyncBatchNorm(4),
    "BatchRenorm2d": lambda: bnlab.BatchRenorm2d(4),
    "CrossIterationBatchNorm2d": lambda: bnlab.CrossIterationBatchNorm2d(4, window=3).pair(nn.Conv2d(3, 4, 3)),
}


@pytest.mark.parametrize("kind", list(RUNTIME_NO_STATS))
def test_running_statistics_dropped_after_construction_give_batch_statistics_or_a_clear_refusal(kind):
    """Test-time adaptation recipes (TENT) set track_running_stats = False and running_mean =
    running_var = None on BN layers they find: BN then normalizes with batch statistics in both
    modes, as torch's. (Batch Renorm and cross-iteration BN, which keep running statistics by
    construction, failed with a TypeError or AttributeError, or said their producer had not run.)"""
    torch.manual_seed(0)
    layer = RUNTIME_NO_STATS[kind]().double()
    producer = layer.producer.double() if kind == "CrossIterationBatchNorm2d" else nn.Identity()
    u = torch.randn(6, *((3, 7, 7) if kind == "CrossIterationBatchNorm2d" else (4, 5, 5)), dtype=DOUBLE) * 2 + 1
    layer(producer(u))
    layer.track_running_stats, layer.running_mean, layer.running_var = False, None, None
    for mode in (True, False):
        layer.train(mode)
        if layer.needs_running_stats:
            with pytest.raises(ValueError, match="keeps running statistics, but track_running_stats was set False"):
                layer(producer(u))
            continue
        x = producer(u)
        expected = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.1, layer.eps)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["BatchNorm2d", "fused", "BatchNormAct2d", "GhostBatchNorm2d", "SyncBatchNorm"])
def test_tracking_turned_on_again_without_the_buffers_takes_batch_statistics_and_counts_as_torchs(kind):
    """After test-time adaptation's recipe (track_running_stats False, running_mean and running_var
    None) the flag set True again without new buffers: torch's BN takes batch statistics in both
    modes and counts the training batches. bnlab's layers failed with an AttributeError
    ("'NoneType' object has no attribute 'dtype'") until 2026-11-25."""
    torch.manual_seed(0)
    layer, twin = RUNTIME_NO_STATS[kind]().double(), nn.BatchNorm2d(4, dtype=DOUBLE)
    for module in (layer, twin):
        module.track_running_stats, module.running_mean, module.running_var = False, None, None
        module.track_running_stats = True
    for training in (True, True, False):
        layer.train(training), twin.train(training)
        x = torch.randn(6, 4, 5, 5, dtype=DOUBLE) * 2 + 1
        torch.testing.assert_close(layer(x), twin(x), rtol=1e-10, atol=1e-12)
    assert int(layer.num_batches_tracked) == int(twin.num_batches_tracked) == 2


@pytest.mark.parametrize("kind", [k for k in RUNTIME_NO_STATS if k != "BatchRenorm2d"])  # (its own moving averages)
def test_momentum_set_to_none_after_construction_averages_cumulatively_as_torchs(kind):
    """torch's way to ask for the equal-weight average of all batches (what swa_utils.update_bn does
    to each layer, and code written after it: reset, momentum = None, a pass over the data). It
    failed with a TypeError in every bnlab layer."""
    torch.manual_seed(0)
    layer = RUNTIME_NO_STATS[kind]().double()
    producer = layer.producer.double() if kind == "CrossIterationBatchNorm2d" else nn.Identity()
    twin = nn.BatchNorm2d(4, dtype=DOUBLE)
    for module in (layer, twin):
        module.reset_running_stats()
        module.momentum = None
    shape = (6, 3, 7, 7) if kind == "CrossIterationBatchNorm2d" else (6, 4, 5, 5)
    for step in range(4):
        x = producer(torch.randn(shape, dtype=DOUBLE) * (step + 1))  # (variances about 1, 4, 9, 16 times)
        layer(x)
        twin(x.detach())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(twin, name), rtol=1e-12, atol=1e-14)
    last = x.detach().var((0, 2, 3))
    assert bool((twin.running_var < 0.7 * last).all())  # (the four batches' average, not the last's alone)


@pytest.mark.parametrize("kind", ["BatchNorm2d", "fused", "BatchNormAct2d", "GhostBatchNorm2d", "SyncBatchNorm"])
def test_a_layer_made_with_momentum_none_takes_a_momentum_set_later_as_torchs(kind):
    """Made with momentum=None (torch's cumulative average), then given a momentum: torch's BN
    takes the moving average from then on. bnlab's kept averaging cumulatively (its stats, derived
    from momentum at construction, stayed "cumulative") until 2026-11-25: found by a throwaway
    fuzzer of run-time changes against torch. A stats given by hand still decides."""
    torch.manual_seed(0)
    made = {"BatchNorm2d": lambda: bnlab.BatchNorm2d(4, momentum=None),
            "fused": lambda: bnlab.BatchNorm2d(4, momentum=None, backend="fused"),
            "BatchNormAct2d": lambda: bnlab.BatchNormAct2d(4, act="identity", momentum=None),
            "GhostBatchNorm2d": lambda: bnlab.GhostBatchNorm2d(4, virtual_batch_size=6, momentum=None),
            "SyncBatchNorm": lambda: bnlab.SyncBatchNorm(4, momentum=None)}
    layer = made[kind]().double()
    twin = nn.BatchNorm2d(4, momentum=None, dtype=DOUBLE)
    given = bnlab.BatchNorm2d(4, momentum=None, stats="cumulative", dtype=DOUBLE)
    for step in range(5):
        if step == 2:
            for module in (layer, twin, given):
                module.momentum = 0.3
            assert (layer.stats, given.stats) == ("ema", "cumulative")
        x = torch.randn(6, 4, 5, 5, dtype=DOUBLE) * (step + 1)
        layer(x), twin(x), given(x)
        torch.testing.assert_close(layer.running_var, twin.running_var, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(given.running_var, twin.running_var)  # (the cumulative average, as asked)
    layer.momentum = None
    assert layer.stats == "cumulative"


REFUSED_SETTINGS = {  # what the constructors refuse, set after construction: (name, value, message)
    "BatchNorm2d": [("stats", "emma", r"stats must be one of \('ema', 'cumulative'\), got 'emma'"),
                    ("momentum", 1.98, "momentum must be None .* or 0 <= momentum <= 1"),
                    ("momentum", -0.1, "momentum must be None"), ("momentum", "0.1", "momentum must be None"),
                    ("eps", -1e-5, "eps must be 0 or more"), ("eps", float("nan"), "eps must be 0 or more"),
                    ("backend", "cuda", "backend must be one of")],
    "BatchNormAct2d": [("act", "gelu", "act must be one of"), ("act", "ReLU", "act must be one of"),
                       ("negative_slope", None, "negative_slope must be a number")],
    "GhostBatchNorm2d": [("virtual_batch_size", 0, "virtual_batch_size must be an integer of at least 1"),
                         ("virtual_batch_size", 2.5, "virtual_batch_size must be an integer of at least 1"),
                         ("virtual_batch_size", True, "virtual_batch_size must be an integer of at least 1")],
    "BatchRenorm2d": [("r_max", 0.5, "it needs r_max >= 1 and d_max >= 0, got r_max=0.5"),
                      ("d_max", -1.0, "it needs r_max >= 1 and d_max >= 0, got d_max=-1.0"),
                      ("warmup", -5, "warmup must be 0 or more iterations")],
    "CrossIterationBatchNorm2d": [("burn_in", -1, "burn_in must be 0 or more iterations"),
                                  ("eps", -1.0, "eps must be 0 or more")],
    "SyncBatchNorm": [("momentum", 2.0, "momentum must be None")],
}


@pytest.mark.parametrize("kind", list(REFUSED_SETTINGS))
def test_what_the_constructor_refuses_is_refused_when_set_after_construction_at_that_line(kind):
    """Set after construction, these went through: an unknown stats was taken as "ema", momentum
    1.98 was folded in as it was (running statistics of the wrong sign), a negative eps gave NaN
    (torch's BN refuses it), an unknown act gave no activation in eval mode, virtual_batch_size 0
    raised ZeroDivisionError at the next forward and r_max 0.5 clipped r to an empty range. Each
    setting is now checked as it is set, by the same check as the constructor's (which now also
    refuses what it let through: a virtual_batch_size of 2.5, an eps of "0.1")."""
    for name, value, message in REFUSED_SETTINGS[kind]:
        layer = RUNTIME_NO_STATS[kind]()
        before = getattr(layer, name)
        with pytest.raises(ValueError, match=message):
            setattr(layer, name, value)
        assert getattr(layer, name) == before, name  # (kept as it was)
        with pytest.raises(ValueError, match=message):  # (every setting is a constructor argument)
            type(layer)(4, **{name: value})


def test_settings_set_after_construction_that_are_allowed_are_taken():
    """A NumPy integer is an integer; momentum None is torch's cumulative average; Keras' 0.99,
    legal, is warned about at the line that sets it, as at construction."""
    layer = bnlab.GhostBatchNorm2d(4, virtual_batch_size=2)
    layer.virtual_batch_size = np.int64(3)
    assert type(layer.virtual_batch_size) is int
    layer(torch.randn(6, 4, 3, 3))
    layer.momentum = None
    layer.eps = 0
    with pytest.warns(UserWarning, match=r"Keras' momentum=0.99 is momentum=0.01 here") as record:
        layer.momentum = 0.99
    assert record[0].filename == __file__ and layer.momentum == 0.99
    cumulative = bnlab.BatchNorm2d(4, stats="cumulative")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the cumulative average takes no momentum: nothing to warn about)
        cumulative.momentum = 0.99


@pytest.mark.parametrize("kind", list(RUNTIME_NO_STATS))
@pytest.mark.parametrize("training", [True, False])
def test_a_parameter_or_buffer_replaced_by_one_of_another_length_is_refused_by_name(kind, training):
    """torch's BN says "weight should contain 4 elements not 3"; bnlab's training forward on torch's
    native kernel or its own fused kernels read the short weight past its end and returned an
    output (the error came in the backward, if at all)."""
    for name in RUNTIME_NO_STATS[kind]().per_channel:
        layer = RUNTIME_NO_STATS[kind]().train(training)
        producer = layer.producer if kind == "CrossIterationBatchNorm2d" else nn.Identity()
        short = torch.ones(3)
        if name in layer._parameters:
            setattr(layer, name, nn.Parameter(short))
        else:
            setattr(layer, name, short)
        with pytest.raises(ValueError, match=rf"its {name} has shape \(3,\), expected \(4,\), one value per channel"):
            layer(producer(torch.randn((6, 3, 7, 7) if kind == "CrossIterationBatchNorm2d" else (6, 4, 5, 5))))


@pytest.mark.parametrize("kind", ["BatchNorm2d", "fused", "BatchNormAct2d", "SyncBatchNorm"])
def test_track_running_stats_set_false_after_construction_stops_the_updates_as_in_torch(kind):
    """torch's BN, its running statistics kept but the flag set False: training takes batch
    statistics and folds nothing in; eval mode still uses the running statistics (bnlab's layers
    took batch statistics there). The converters both ways and fuse keep that."""
    torch.manual_seed(0)
    ours, theirs = RUNTIME_NO_STATS[kind]().double(), nn.BatchNorm2d(4, dtype=DOUBLE)
    x0, x = torch.randn(6, 4, 5, 5, dtype=DOUBLE) * 3 + 2, torch.randn(6, 4, 5, 5, dtype=DOUBLE)
    ours(x0)
    theirs(x0)
    for layer in (ours, theirs):
        layer.track_running_stats = False
    for mode in (True, False):
        for layer in (ours, theirs):
            layer.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-12)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-12, atol=1e-14)
    expected = theirs(x)  # (eval mode: the running statistics of x0's batch)
    assert (expected - nn.functional.batch_norm(x, None, None, training=True)).abs().max() > 0.1
    for converted in (bnlab.to_torch(ours), bnlab.convert(copy.deepcopy(theirs))):
        layer = converted[0] if isinstance(converted, nn.Sequential) else converted  # (BatchNormAct's BN)
        assert not layer.track_running_stats and layer.running_mean is not None
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-12)
    fused = bnlab.fuse(nn.Sequential(nn.Conv2d(4, 4, 1, dtype=DOUBLE), ours))
    assert isinstance(fused[1], nn.Identity)


def test_ghost_batch_norm_without_running_statistics_takes_the_whole_batch_in_eval_mode():
    """(it normalized each virtual batch by itself in eval mode too: an output that depended on
    how the batch was chunked, the inference bug that ghost BN must not have)"""
    x = torch.randn(8, 3, dtype=DOUBLE) * 2 + 1
    ghost = bnlab.GhostBatchNorm1d(3, virtual_batch_size=2, track_running_stats=False, dtype=DOUBLE)
    reference = nn.BatchNorm1d(3, track_running_stats=False, dtype=DOUBLE)
    torch.testing.assert_close(ghost.eval()(x), reference.eval()(x))
    y = ghost.train()(x)  # training: each pair of examples by its own statistics
    torch.testing.assert_close(y[:2], reference.train()(x[:2]))


@settings(max_examples=20, deadline=None)
@given(a=st.floats(0.1, 10), b=st.floats(-10, 10), seed=st.integers(0, 1000))
def test_property_invariant_to_positive_affine_input_change(a, b, seed):
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = bnlab.BatchNorm2d(3, eps=0.0, dtype=torch.float64)
    torch.testing.assert_close(layer(a * x + b), layer(x), rtol=1e-8, atol=1e-8)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), backend=st.sampled_from(["native", "autograd", "fused"]))
def test_property_zero_mean_unit_variance_and_batch_permutation(seed, backend):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 4, 3, generator=g, dtype=torch.float64) * 5 - 2
    layer = bnlab.BatchNorm1d(4, eps=0.0, dtype=torch.float64, backend=backend)
    y = layer(x)
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var((0, 2), unbiased=False), torch.ones(4, dtype=torch.float64))
    perm = torch.randperm(7, generator=g)
    torch.testing.assert_close(layer(x[perm]), y[perm])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000))
def test_property_eval_output_depends_on_buffers_only(seed):
    g = torch.Generator().manual_seed(seed)
    layer = bnlab.BatchNorm1d(3, dtype=torch.float64)
    layer(torch.randn(5, 3, generator=g, dtype=torch.float64))
    layer.eval()
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(layer(x), alone)  # no dependence on the other examples


@pytest.mark.parametrize("cls", [bnlab.BatchNorm2d, bnlab.BatchRenorm2d, bnlab.GhostBatchNorm2d])
def test_a_keras_style_momentum_is_warned_about_at_the_users_line(cls):
    """Keras' momentum=0.99 (the old average's weight) means the opposite here: the running
    statistics would follow the last batches. Legal, so a warning, pointing at the caller's line."""
    with pytest.warns(UserWarning, match=r"Keras' momentum=0.99 is momentum=0.01 here") as record:
        layer = cls(3, momentum=0.99)
    assert record[0].filename == __file__ and layer.momentum == 0.99
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for momentum in (0.1, 0.5, 1.0, None, 0.0):
            cls(3, momentum=momentum)


# bnlab.fuse: batch-norm layers folded into their producers for inference


def trained(model: nn.Module, x_shape, steps: int = 4) -> nn.Module:
    """``model`` after a few training steps (running statistics away from 0 and 1, a moved affine),
    in float64."""
    model = model.to(DOUBLE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        (model(torch.randn(*x_shape, generator=g, dtype=DOUBLE) * 3 + 1) ** 2).mean().backward()
        opt.step()
    return model


FUSABLE = [
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), bnlab.BatchNorm2d(6)), (5, 3, 7, 7), ["Conv2d", "Identity"]),
    (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), bnlab.BatchNorm1d(6)), (5, 3, 9), ["Conv1d", "Identity"]),
    (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, groups=2), bnlab.BatchNorm3d(4, affine=False)), (4, 2, 5, 5, 5),
     ["Conv3d", "Identity"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, dilation=1), bnlab.BatchNormAct2d(6, act="leaky_relu",
                                                                                          negative_slope=0.2)),
     (5, 3, 7, 7), ["Conv2d", "LeakyReLU"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), bnlab.BatchNormAct2d(6, act="silu")), (5, 3, 7, 7), ["Conv2d", "SiLU"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), bnlab.BatchRenorm2d(6, warmup=0)), (5, 3, 7, 7), ["Conv2d", "Identity"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), bnlab.GhostBatchNorm2d(6, virtual_batch_size=2)), (6, 3, 7, 7),
     ["Conv2d", "Identity"]),
    (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), bnlab.SyncBatchNorm(6)), (5, 3, 7, 7), ["Conv2d", "Identity"]),
    (lambda: bnlab.cross_iteration(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(),
                                                 nn.Linear(6 * 25, 4), nn.BatchNorm1d(4)), window=2),
     (5, 3, 7, 7), ["Conv2d", "Identity", "Flatten", "Linear", "Identity"]),
    # Transposed convs (a decoder's, a GAN generator's upsampling): the weight is (C_in, C/G, *k)
    (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), bnlab.BatchNormAct2d(6)), (5, 4, 4, 4),
     ["ConvTranspose2d", "ReLU"]),
    (lambda: nn.Sequential(nn.ConvTranspose1d(3, 5, 2, bias=False), nn.BatchNorm1d(5)), (5, 3, 6),
     ["ConvTranspose1d", "Identity"]),
    (lambda: nn.Sequential(nn.ConvTranspose3d(6, 3, 2, groups=3), bnlab.BatchNorm3d(3)), (4, 6, 3, 3, 3),
     ["ConvTranspose3d", "Identity"]),
    (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, bias=False),
                           bnlab.BatchNormAct1d(3, act="sigmoid")), (8, 4), ["Linear", "Identity", "ReLU", "Linear",
                                                                            "Sigmoid"]),
]


@pytest.mark.parametrize("make, x_shape, kinds", FUSABLE)
def test_fuse_folds_every_layer_kind_into_its_producer_with_the_eval_outputs(make, x_shape, kinds):
    model = trained(make(), x_shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.randn(2, *x_shape[1:], dtype=DOUBLE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing left behind)
        fused = bnlab.fuse(model, example_inputs=(example,))
    assert [type(m).__name__ for m in fused] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model itself untouched
    assert model.training and not fused.training
    model.eval()
    x = torch.randn(*x_shape, dtype=DOUBLE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_fuse_is_the_paper_s_affine_map_of_the_running_statistics():
    """W'_j = s_j W_j, b'_j = s_j (b_j - E[x]_j) + beta_j with s = gamma / sqrt(Var[x] + eps), by hand."""
    conv, bn = nn.Conv2d(2, 3, 1, dtype=DOUBLE), bnlab.BatchNorm2d(3, eps=0.1, dtype=DOUBLE)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, 3.0, -1.0]))
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    fused = bnlab.fuse(nn.Sequential(conv, bn))
    s = torch.tensor([2.0, -1.0, 0.5], dtype=DOUBLE) / torch.sqrt(torch.tensor([4.1, 0.35, 9.1], dtype=DOUBLE))
    torch.testing.assert_close(fused[0].weight, w * s.view(3, 1, 1, 1), rtol=1e-15, atol=0)
    torch.testing.assert_close(fused[0].bias, s * (b - torch.tensor([1.0, -2.0, 0.5], dtype=DOUBLE))
                               + torch.tensor([0.0, 3.0, -1.0], dtype=DOUBLE), rtol=1e-15, atol=1e-15)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), bnlab.BatchNorm2d(3)
        self.again, self.bn2 = nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3)
        self.relu, self.bn3 = nn.ReLU(), bnlab.BatchNorm2d(3)
        self.stats = bnlab.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + y  # the conv's output is used twice
        z = self.bn2(self.again(y)) + self.again(x)  # a conv run twice
        return self.bn3(self.relu(z)) + self.stats(z)  # after a ReLU; batch statistics in eval mode


@pytest.mark.parametrize("inplace", [False, True])
def test_fuse_leaves_what_folding_would_change_and_says_why(inplace):
    model = trained(Residual(), (4, 3, 5, 5))
    model.eval()
    x = torch.randn(3, 3, 5, 5, dtype=DOUBLE)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning) as record:
        fused = bnlab.fuse(model, example_inputs=(x,), inplace=inplace)
    message = str(record[0].message)
    for reason in ("'bn': its producer's output is also used elsewhere",
                   "'bn2': its producer 'again' runs more than once",
                   "'bn3': its input comes from 'relu', not from a Linear or a Conv or ConvTranspose 1d/2d/3d",
                   "'stats': it keeps no running statistics"):
        assert reason in message
    assert (fused is model) == inplace
    assert all(isinstance(getattr(fused, n), bnlab.BatchNorm2d) for n in ("bn", "bn2", "bn3", "stats"))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)


def test_fuse_folds_a_linear_only_where_its_output_is_n_by_c():
    """Batch norm normalizes dimension 1, a Linear's features are its last: on (N, L, C) with L = C
    the channels would be the wrong ones, silently."""
    model = trained(nn.Sequential(nn.Linear(5, 5), bnlab.BatchNorm1d(5)), (4, 5, 5))
    with pytest.warns(UserWarning, match=r"its Linear's output is \(2, 5, 5\), not \(N, C\)"):
        fused = bnlab.fuse(model, example_inputs=(torch.randn(2, 5, 5, dtype=DOUBLE),))
    assert isinstance(fused[1], bnlab.BatchNorm1d)
    flat = trained(nn.Sequential(nn.Linear(5, 5), bnlab.BatchNorm1d(5)), (4, 5))
    with pytest.warns(UserWarning, match="its input is not flattened from dimension 1, and no example_inputs"):
        assert isinstance(bnlab.fuse(flat)[1], bnlab.BatchNorm1d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(bnlab.fuse(flat, example_inputs=(torch.randn(2, 5, dtype=DOUBLE),))[1], nn.Identity)
        # one tensor, as cross_iteration takes it, is the forward's one argument
        assert isinstance(bnlab.fuse(flat, example_inputs=torch.randn(2, 5, dtype=DOUBLE))[1], nn.Identity)


@pytest.mark.parametrize("flatten", [None, lambda y: y.flatten(1), lambda y: torch.flatten(y, 1),  # (None: nn.Flatten)
                                     lambda y: torch.flatten(y, start_dim=1)])
def test_fuse_folds_a_cnn_head_s_linear_without_example_inputs(flatten):
    """After a flatten from dimension 1 a Linear's output is (N, C) whatever the input."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.flat = nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.Flatten()
            self.fc, self.bn1 = nn.Linear(4 * 16, 5), bnlab.BatchNorm1d(5)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return self.bn1(self.fc(self.flat(y) if flatten is None else flatten(y)))

    model = trained(Head(), (4, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = bnlab.fuse(model)
    assert isinstance(fused.bn, nn.Identity) and isinstance(fused.bn1, nn.Identity)
    model.eval()
    x = torch.randn(3, 3, 6, 6, dtype=DOUBLE)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_fuse_leaves_a_shared_weight_and_a_parametrized_one():
    tied = nn.Sequential(nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3), nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3))
    tied[2].weight = tied[0].weight
    standardized = nn.Sequential(nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3))
    torch.nn.utils.parametrize.register_parametrization(standardized[0], "weight", nn.Tanh())
    for model, reason in ((tied, "shares a parameter with another layer"),
                          (standardized, "weight is a parametrization")):
        model = trained(model, (4, 3, 4, 4))
        with pytest.warns(UserWarning, match=reason):
            fused = bnlab.fuse(model, example_inputs=(torch.randn(2, 3, 4, 4, dtype=DOUBLE),))
        assert isinstance(fused[1], bnlab.BatchNorm2d)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("hook", [torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm,
                                  lambda conv: prune.l1_unstructured(conv, "weight", 1)],
                         ids=["weight_norm", "spectral_norm", "prune"])
def test_fuse_leaves_a_weight_that_a_forward_hook_sets_and_says_how_to_copy_such_a_model(hook):
    """(torch.nn.utils.prune and the older weight_norm and spectral_norm set the conv's weight before
    each forward from other parameters: fuse folded the layer into that attribute, which the next
    forward overwrote, and the fused model's outputs were off, without a warning.)"""
    model = trained(nn.Sequential(hook(nn.Conv2d(3, 3, 1)), bnlab.BatchNorm2d(3), nn.ReLU()), (4, 3, 4, 4))
    model.eval()
    x = torch.randn(2, 3, 4, 4, dtype=DOUBLE)
    with torch.no_grad():
        expected = model(x)  # (and the hook's weight holds no graph: a deep copy works)
    with pytest.warns(UserWarning, match="'1': its producer's weight is set by a forward hook .* remove_weight_norm"):
        fused = bnlab.fuse(model)
    assert isinstance(fused[1], bnlab.BatchNorm2d)
    torch.testing.assert_close(fused(x), expected, rtol=0, atol=0)
    model(x)  # (with a graph: torch's deepcopy refuses the hook's weight)
    with pytest.raises(ValueError, match="fuse: cannot copy the model .* torch.no_grad.* inplace=True"):
        bnlab.fuse(model)


def test_fuse_removes_a_cross_iteration_layers_hook_from_its_producer():
    model = trained(bnlab.cross_iteration(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), window=2),
                    (4, 3, 5, 5))
    assert len(model[0]._forward_hooks) == 1
    fused = bnlab.fuse(model)
    assert len(fused[0]._forward_hooks) == 0 and len(model[0]._forward_hooks) == 1


class ConvBN(nn.Module):
    """A 1x1 conv and bnlab's BN, for models whose forward a test writes."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3)


def test_fuse_refuses_a_model_fx_cannot_trace_and_checks_its_outputs():
    class Branchy(ConvBN):
        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ValueError, match=r"could not trace the model.*fuse\(model.backbone, inplace=True\)"):
        bnlab.fuse(Branchy())
    # A hook that changes the conv's output is not in the fx graph: the outputs' check catches it.
    model = trained(nn.Sequential(nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3)), (4, 3, 4, 4))
    model[0].register_forward_hook(lambda module, args, output: output * 2)
    with pytest.raises(ValueError, match="the fused model's output differs from the model's"):
        bnlab.fuse(model, example_inputs=(torch.randn(2, 3, 4, 4, dtype=DOUBLE),))
    # In place, the failed check undoes the folds and the switch to eval mode (until 2026-11-24 the
    # model was left folded, its outputs wrong): the model is as it was, bias-less conv included.
    model = trained(nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), bnlab.BatchNormAct2d(3),
                                  nn.Conv2d(3, 3, 1), bnlab.BatchNorm2d(3)), (4, 3, 4, 4))
    model[2].register_forward_hook(lambda module, args, output: output * 2)
    model[3].eval()
    state, layers = copy.deepcopy(model.state_dict()), list(model)
    with pytest.raises(ValueError, match="the fused model's output differs from the model's"):
        bnlab.fuse(model, example_inputs=(torch.randn(2, 3, 4, 4, dtype=DOUBLE),), inplace=True)
    assert list(model) == layers and model[0].bias is None
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# (fx's fuser imports torch.jit.script_method, deprecated)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_fx_traces_every_layer_as_a_leaf_like_torch_nns():
    """torch.fx.symbolic_trace (and what builds on it: torchvision's feature extraction, FX
    quantization, fx's fuser) took bnlab's layers for code to trace through, and their input
    checks raised TraceError; now each call is one call_module node, as torch.nn's are."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNorm2d(8), nn.ReLU(), bnlab.BatchNormAct2d(8),
                             bnlab.GhostBatchNorm2d(8, virtual_batch_size=2), bnlab.BatchRenorm2d(8), nn.Flatten(),
                             nn.Linear(8 * 16, 5), bnlab.BatchNorm1d(5, momentum=None)).to(DOUBLE)

    model, traced = build(), torch.fx.symbolic_trace(build())
    kinds = {node.target: type(traced.get_submodule(node.target)).__name__ for node in traced.graph.nodes
             if node.op == "call_module"}
    assert kinds == {str(i): type(m).__name__ for i, m in enumerate(model)}
    x = torch.randn(6, 3, 6, 6, dtype=DOUBLE)
    for _ in range(3):
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(traced.state_dict(), model.state_dict(), rtol=0, atol=0)
    traced.eval(), model.eval()
    torch.testing.assert_close(traced(x[:1]), model(x[:1]), rtol=0, atol=0)
    from torch.fx.experimental.optimization import fuse as fx_fuse

    fx_fuse(model)  # (it folds torch.nn's pairs only; it traced nothing before)


def test_fuse_checks_outputs_that_hold_nan_where_the_model_s_do():
    class WithNaN(ConvBN):
        def forward(self, x):
            y = self.bn(self.conv(x))
            return y, y.sum() * float("nan")  # (a loss term undefined on the example, say)

    model = WithNaN().to(DOUBLE)
    model(torch.randn(4, 3, 2, 2, dtype=DOUBLE))  # (running statistics)
    fused = bnlab.fuse(model, example_inputs=(torch.randn(2, 3, 2, 2, dtype=DOUBLE),))
    assert isinstance(fused.bn, nn.Identity)
