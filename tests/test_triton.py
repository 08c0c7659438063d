"""The Triton kernels, run on the CPU by Triton's interpreter, against the reference and torch.

TRITON_INTERPRET=1 is set before Triton is imported; on a machine with a GPU the same tests can
run on CUDA tensors by setting BNLAB_TEST_DEVICE=cuda (and unsetting TRITON_INTERPRET).
"""

import os
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

DEVICE = os.environ.get("BNLAB_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="Triton is not installed (pip install bnlab[triton])")

import bnlab  # noqa: E402
from bnlab import functional as F  # noqa: E402
from bnlab import reference as R  # noqa: E402
from bnlab.kernels import triton_bn  # noqa: E402

ACTS = {"identity": lambda u: u, "relu": torch.relu, "leaky_relu": lambda u: torch.nn.functional.leaky_relu(u, 0.1),
        "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
# Odd sizes: C and N*S not multiples of the block; m = 1,200 spans two blocks of 1,024.
CASES = [((5, 7), "rows"), ((3, 5, 11), "ncl"), ((3, 2, 20, 20), "nchw"), ((3, 2, 20, 20), "channels_last"),
         ((7, 3, 1, 1), "nchw"), ((2, 3, 3, 5), "channels_last")]


def make(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(shape[1], generator=g) + 0.5
    b = torch.randn(shape[1], generator=g) * 0.5
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE), b.to(DEVICE), dy.to(DEVICE, dtype)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape, layout", CASES)
def test_forward_backward_and_running_stats_float32(act, shape, layout):
    x, w, b, dy = make(shape, layout, torch.float32)
    rm, rv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
    y, mean, invstd, folded = F.batch_norm_act_train(xi, wi, bi, 1e-5, act, 0.1, "triton", rm, rv, 0.1)
    y.backward(dy)
    ref = R.batch_norm_train(x.double().cpu().numpy(), w.double().cpu().numpy(), b.double().cpu().numpy())
    np.testing.assert_allclose(mean.cpu().numpy(), ref["mu_B"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invstd.cpu().numpy(), 1 / np.sqrt(ref["sigma2_B"] + 1e-5), rtol=1e-4)
    expected_y = ACTS[act](torch.from_numpy(ref["y"])).to(DEVICE, torch.float32)
    torch.testing.assert_close(y, expected_y, **TOL[torch.float32])
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    trm, trv = torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)
    ACTS[act](torch.nn.functional.batch_norm(xt, trm, trv, wt, bt, True, 0.1)).backward(dy)
    for ours, theirs in [(xi.grad, xt.grad), (wi.grad, wt.grad), (bi.grad, bt.grad), (rm, trm), (rv, trv)]:
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
    assert folded


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, layout", [((3, 2, 20, 20), "nchw"), ((4, 6), "rows")])
def test_low_precision_inputs_float32_statistics(dtype, shape, layout):
    x, w, b, dy = make(shape, layout, dtype)
    try:
        y, mean, invstd = triton_bn.forward(x, w, b, 1e-5, "relu", 0.0)
    except Exception as err:  # the interpreter's support for these dtypes varies by Triton version
        pytest.skip(f"Triton cannot run {dtype} here: {err}")
    assert y.dtype == dtype and mean.dtype == torch.float32
    ref = R.batch_norm_train(x.double().cpu().numpy(), w.double().cpu().numpy(), b.double().cpu().numpy())
    np.testing.assert_allclose(mean.cpu().numpy(), ref["mu_B"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.float(), torch.relu(torch.from_numpy(ref["y"])).float().to(DEVICE), **TOL[dtype])
    dx, dw, db = triton_bn.backward(dy, x, w, b, mean, invstd, "relu", 0.0)
    xt, wt, bt = x.float().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    torch.relu(torch.nn.functional.batch_norm(xt, None, None, wt, bt, True)).backward(dy.float())
    torch.testing.assert_close(dx.float(), xt.grad, **TOL[dtype])
    torch.testing.assert_close(db, bt.grad, **TOL[dtype])
    torch.testing.assert_close(dw, wt.grad, **TOL[dtype])


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape, layout", CASES)
def test_inference_is_one_pass_with_folded_scale_and_shift(act, shape, layout):
    x, w, b, _ = make(shape, layout, torch.float32)
    rm = torch.randn(shape[1], device=DEVICE)
    rv = torch.rand(shape[1], device=DEVICE) + 0.5
    y = triton_bn.inference(x, w, b, rm, rv, 1e-5, act, 0.1)
    expected = ACTS[act](torch.nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))
    torch.testing.assert_close(y, expected, **TOL[torch.float32])


# Layouts a model hands over besides the CASES': name -> (the shape of a tensor, the view of it).
VIEWS = {
    "(N, C) column slice": ((6, 10), lambda t: t[:, ::2]),
    "(N, C) expanded": ((1, 5), lambda t: t.expand(6, 5)),
    "(N, C, L) strided": ((4, 3, 14), lambda t: t[:, :, ::2]),
    "(N, C, L) transposed": ((4, 7, 3), lambda t: t.transpose(1, 2)),
    "(N, C, H, W) H and W transposed": ((3, 2, 5, 6), lambda t: t.transpose(2, 3)),
    "(N, C, H, W) strided rows": ((3, 2, 10, 6), lambda t: t[:, :, ::2]),
    "(N, C, H, W) channel slice": ((3, 4, 5, 6), lambda t: t[:, 1:3]),
    "(N, C, H, W) channels_last slice": ((3, 4, 5, 6), lambda t: t.to(memory_format=torch.channels_last)[:, 1:3]),
    # (torch calls it contiguous: the size-1 dim's stride is 2, W's 1, and the last dim is H)
    "(N, C, H, W) W of 1 transposed": ((5, 2, 1, 3), lambda t: t.transpose(2, 3)),
}


@pytest.mark.parametrize("view", VIEWS)
def test_any_input_layout_trains_and_infers_as_torch(view):
    """Strided, sliced, expanded and transposed views, through the layer (two training steps:
    outputs, gradients, running statistics) and the inference kernel. The kernels write the
    output at the input's offsets, so they take a layout as it is only where an empty tensor like
    it has its strides; an output allocated otherwise was written out of its bounds (a heap
    corruption on the CPU) or in part, and transposed H and W were refused in the backward (until
    2026-11-24). The spatial stride is the innermost dim's longer than 1."""
    g = torch.Generator().manual_seed(1)
    shape, view_of = VIEWS[view]
    base = (torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE)
    c = view_of(base).shape[1]
    rank = view_of(base).dim()
    ours = (bnlab.BatchNormAct1d if rank < 4 else bnlab.BatchNormAct2d)(c, act="leaky_relu", negative_slope=0.1,
                                                                       backend="triton").to(DEVICE)
    theirs = (torch.nn.BatchNorm1d if rank < 4 else torch.nn.BatchNorm2d)(c).to(DEVICE)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5, generator=g)
        theirs.bias.uniform_(-1, 1, generator=g)
    ours.load_state_dict(theirs.state_dict())
    for _ in range(2):
        bo, bt = base.clone().requires_grad_(), base.clone().requires_grad_()
        yo, yt = ours(view_of(bo)), ACTS["leaky_relu"](theirs(view_of(bt)))
        dy = torch.randn(yt.shape, generator=g).to(DEVICE)
        yo.backward(dy), yt.backward(dy)
        for a, b in ((yo, yt), (bo.grad, bt.grad), (ours.weight.grad, theirs.weight.grad),
                     (ours.bias.grad, theirs.bias.grad), (ours.running_mean, theirs.running_mean),
                     (ours.running_var, theirs.running_var)):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    x, w, b = view_of(base), theirs.weight.detach(), theirs.bias.detach()
    y = triton_bn.inference(x, w, b, theirs.running_mean, theirs.running_var, 1e-5, "leaky_relu", 0.1)
    expected = ACTS["leaky_relu"](torch.nn.functional.batch_norm(x, theirs.running_mean, theirs.running_var, w, b))
    torch.testing.assert_close(y, expected, **TOL[torch.float32])


LAYOUTS = {  # a view of a contiguous tensor, as a model may hand it over
    "contiguous": lambda t: t,
    "channels_last": lambda t: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t,
    "last two dims transposed": lambda t: t.transpose(-1, -2) if t.dim() > 3 else t,
    "batch-dim order reversed": lambda t: t.transpose(0, -1).contiguous().transpose(0, -1),
    "every other example": lambda t: t[::2],
    "channel slice": lambda t: t[:, 1:],
}


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_the_layers_on_triton_train_and_infer_as_torchs_bn_and_activation(data):
    """Random rank (2-5), sizes (1 included), layout, activation, momentum (a rate or None, the
    cumulative average), affine and running-statistics flags: two training steps (outputs, input
    and parameter gradients), inference, and the state_dict, against torch.nn's BN and the
    activation."""
    rank = data.draw(st.integers(2, 5), "rank")
    layout = data.draw(st.sampled_from(sorted(LAYOUTS)), "layout")
    n = data.draw(st.integers(4 if layout == "every other example" else 2, 7), "N")
    c = data.draw(st.integers(2 if layout == "channel slice" else 1, 6), "C")
    size = st.one_of(st.just(1), st.integers(2, 7))  # (1 often: a dim of size 1 may have any stride)
    shape = (n, c, *data.draw(st.lists(size, min_size=rank - 2, max_size=rank - 2), "spatial"))
    act = "identity" if rank == 5 else data.draw(st.sampled_from(sorted(ACTS)), "act")
    kw = dict(affine=data.draw(st.booleans(), "affine"), track_running_stats=data.draw(st.booleans(), "track"),
              momentum=data.draw(st.sampled_from([0.1, 0.3, None]), "momentum"))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    base = (torch.randn(shape, generator=g) * 3 - 1).to(DEVICE)
    view = LAYOUTS[layout]
    c = view(base).shape[1]  # (a channel slice has one fewer)
    if rank == 5:
        ours = bnlab.BatchNorm3d(c, backend="triton", **kw)
    else:
        ours = (bnlab.BatchNormAct1d if rank < 4 else bnlab.BatchNormAct2d)(c, act=act, negative_slope=0.1,
                                                                           backend="triton", **kw)
    theirs = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[
        rank](c, **kw)
    if kw["affine"]:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=g)
            theirs.bias.uniform_(-1, 1, generator=g)
    ours, theirs = ours.to(DEVICE), theirs.to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        bo, bt = base.clone().requires_grad_(), base.clone().requires_grad_()
        yo, yt = ours(view(bo)), ACTS[act](theirs(view(bt)))
        dy = torch.randn(yt.shape, generator=g).to(DEVICE)
        yo.backward(dy), yt.backward(dy)
        torch.testing.assert_close(yo, yt, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bo.grad, bt.grad, rtol=1e-4, atol=1e-4)
        if kw["affine"]:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(ours(view(base)), ACTS[act](theirs(view(base))), rtol=1e-4, atol=1e-4)
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_batch_norm_act_infers_in_one_pass_without_a_graph_and_differentiably_with_one(act, affine, monkeypatch):
    """BatchNormAct in eval mode: under no_grad one launch of the inference kernel; where autograd
    needs a graph (a gradient with respect to the input in eval mode), torch's ops, differentiable."""
    launches = []
    kernel = triton_bn.inference
    monkeypatch.setattr(triton_bn, "inference", lambda *a: launches.append(a) or kernel(*a))
    g = torch.Generator().manual_seed(2)
    layer = bnlab.BatchNormAct2d(3, act=act, affine=affine, backend="triton").to(DEVICE).eval()
    with torch.no_grad():
        layer.running_mean.normal_(generator=g)
        layer.running_var.uniform_(0.5, 2.0, generator=g)
        if affine:
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-1, 1, generator=g)
    x = torch.randn(4, 3, 5, 5, generator=g).to(DEVICE)
    w, b = (layer.weight.detach(), layer.bias.detach()) if affine else (None, None)
    expected = ACTS[act](torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, w, b))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, **TOL[torch.float32])
    assert len(launches) == 1
    xi, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(xi)
    ACTS[act](torch.nn.functional.batch_norm(xt, layer.running_mean, layer.running_var, w, b)).backward(x)
    y.backward(x)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    torch.testing.assert_close(xi.grad, xt.grad, **TOL[torch.float32])
    assert len(launches) == 1


def test_non_finite_batch_leaves_running_stats_alone():
    x, w, b, _ = make((4, 3, 2, 2), "nchw", torch.float32)
    x[1, 2, 0, 0] = float("nan")
    rm, rv = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    before = rm.clone(), rv.clone()
    *_, folded = F.batch_norm_act_train(x, w, b, 1e-5, "relu", 0.0, "triton", rm, rv, 0.1)
    assert not folded
    # Every channel as it was, as on the CPU: channel 2 had the NaN, and the kernel's update of the
    # finite channels is undone (it used to stay, uncounted in num_batches_tracked).
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    *_, folded = F.batch_norm_act_train(x.nan_to_num(), w, b, 1e-5, "relu", 0.0, "triton", rm, rv, 0.1)
    assert folded and not torch.equal(rm[0], before[0][0])


def test_auto_leaves_float64_and_tensors_beyond_int32_offsets_to_torch():
    """The kernels index in int32: a tensor of 2^31 values or more would wrap its offsets. Asked
    for by name, Triton refuses it with the reason; "auto" gives it to torch's kernels, and
    float64 tensors too (until 2026-11-24 "auto" gave them to the kernels, float32 inside)."""
    huge = torch.zeros(1, 2, 1).expand(2**30, 2, 1)  # (2^31 values, 8 bytes of storage)
    with pytest.raises(ValueError, match="int32 offsets"):
        F.check_triton(huge)
    F.check_triton(huge[: 2**29])  # (fits)
    cuda_tensor = lambda numel, dtype=torch.float32: types.SimpleNamespace(  # noqa: E731
        device=torch.device("cuda"), numel=lambda: numel, dtype=dtype)
    assert F.use_triton(cuda_tensor(2**31 - 1)) and not F.use_triton(cuda_tensor(2**31))
    # (and float64 runs torch's kernels, whose arithmetic is float64; the Triton kernels' is float32)
    assert F.use_triton(cuda_tensor(8, torch.float16)) and not F.use_triton(cuda_tensor(8, torch.float64))


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_a_gradient_of_the_gradient_is_torchs(act):
    """The kernels' backward has no graph; under create_graph=True (a gradient penalty) the
    gradient is autograd's through the same forward in torch ops: the second derivatives are
    torch's BN and activation's."""
    x, w, b, dy = make((3, 2, 4, 4), "nchw", torch.float32)
    results = []
    for backend in ("triton", "native"):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        y = F.batch_norm_act_train(xi, wi, bi, 1e-5, act, 0.1, backend)[0]
        (g,) = torch.autograd.grad((y * dy).sum(), xi, create_graph=True)
        g.square().sum().backward()
        results.append((g.detach(), xi.grad, wi.grad, bi.grad))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])


def test_batched_gradients_and_torch_func_transforms_run_on_torchs_ops():
    """A batched gradient (is_grads_batched=True) goes through torch's ops (the kernels take one at
    a time) and gives each gradient; under a torch.func transform "auto" takes torch's kernels and
    "triton" by name refuses with the reason."""
    x, w, b, dy = make((3, 2, 4, 4), "nchw", torch.float32)
    xi = x.clone().requires_grad_()
    y = F.batch_norm_act_train(xi, w, b, 1e-5, "relu", 0.1, "triton")[0]
    vectors = torch.stack([dy, -2 * dy, dy.flip(0)])
    batched = torch.autograd.grad(y, xi, vectors, is_grads_batched=True, retain_graph=True)[0]
    each = torch.stack([torch.autograd.grad(y, xi, v, retain_graph=True)[0] for v in vectors])
    torch.testing.assert_close(batched, each, **TOL[torch.float32])
    with pytest.raises(ValueError, match="backend='triton' runs bnlab's own kernels"):
        torch.func.grad(lambda t: F.batch_norm_act_train(t, w, b, 1e-5, "relu", 0.1, "triton")[0].sum())(x)


def test_a_tensor_momentum_averages_without_a_host_read():
    """Under torch.compile the cumulative average's weight 1/t is a 0-d tensor (read on the host, it
    would break the graph): the kernel folds the batch in at weight 1 into the working copies, and
    the copies are averaged in with the tensor weight."""
    x, w, b, _ = make((4, 3, 5, 5), "nchw", torch.float32)
    rm = torch.randn(3, device=DEVICE)
    rv = torch.rand(3, device=DEVICE) + 0.5
    trm, trv = rm.clone(), rv.clone()

    class NoHostRead(torch.Tensor):  # (what torch.compile would break its graph on)
        def __float__(self):
            raise AssertionError("the weight was read on the host")

    weight_t = torch.tensor(1.0 / 3.0, dtype=torch.float64, device=DEVICE).as_subclass(NoHostRead)
    folded = F.batch_norm_act_train(x, w, b, 1e-5, "relu", 0.1, "triton", rm, rv, weight_t)[3]
    torch.nn.functional.batch_norm(x, trm, trv, w, b, True, 1.0 / 3.0)
    torch.testing.assert_close(rm, trm, **TOL[torch.float32])
    torch.testing.assert_close(rv, trv, **TOL[torch.float32])
    assert folded
