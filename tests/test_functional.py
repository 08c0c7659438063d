"""bnlab.functional against the NumPy reference (float64) and torch.nn.functional, every backend."""

import numpy as np
import pytest
import torch

import bnlab
from bnlab import functional as F
from bnlab import reference as R
from conftest import rel_err

BACKENDS = ["native", "autograd", "fused"]
SHAPES = [(16, 5), (6, 4, 7), (4, 3, 5, 6), (2, 3, 3, 4, 2)]
FLOAT64_TOL = 1e-10
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


def make(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_training_forward_and_gradients_match_reference(backend, shape):
    x, w, b, dy = make(shape)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y, mean, invstd, _ = F.batch_norm_train(x, w, b, eps=1e-5, backend=backend)
    y.backward(dy)
    ref = R.batch_norm_train(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), eps=1e-5)
    grads = R.batch_norm_backward(dy.numpy(), x.detach().numpy(), w.detach().numpy(), eps=1e-5)
    assert rel_err(y, ref["y"]) < FLOAT64_TOL
    assert rel_err(mean, ref["mu_B"]) < FLOAT64_TOL
    assert rel_err(invstd, 1 / np.sqrt(ref["sigma2_B"] + 1e-5)) < FLOAT64_TOL
    assert rel_err(x.grad, grads["dx"]) < FLOAT64_TOL
    assert rel_err(w.grad, grads["dgamma"]) < FLOAT64_TOL
    assert rel_err(b.grad, grads["dbeta"]) < FLOAT64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_backward_is_the_printed_backward(backend):
    x, w, _, dy = make((9, 4, 3))
    mean, var_biased = F.batch_stats(x)
    dx, dgamma, dbeta = F.batch_norm_backward(dy, x, mean, torch.rsqrt(var_biased + 1e-5), w, backend=backend)
    printed = R.batch_norm_backward(dy.numpy(), x.numpy(), w.numpy())
    assert rel_err(dx, printed["dx"]) < FLOAT64_TOL
    assert rel_err(dgamma, printed["dgamma"]) < FLOAT64_TOL
    assert rel_err(dbeta, printed["dbeta"]) < FLOAT64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_is_algorithm2(backend):
    x, w, b, _ = make((5, 3, 4, 4))
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    y = F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3, backend=backend)
    expected = R.batch_norm_inference(x.numpy(), w.numpy(), b.numpy(), rm.numpy(), rv.numpy(), eps=1e-3)
    assert rel_err(y, expected) < FLOAT64_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_functional_with_running_update(backend, affine):
    x, w, b, dy = make((8, 6, 5, 5), dtype=torch.float32)
    w, b = (w.float(), b.float()) if affine else (None, None)
    rm, rv = torch.zeros(6), torch.ones(6)
    trm, trv = torch.zeros(6), torch.ones(6)
    for step in range(3):
        xs = x * (step + 1)
        y = F.batch_norm(xs, rm, rv, w, b, training=True, momentum=0.3, backend=backend)
        ty = torch.nn.functional.batch_norm(xs, trm, trv, w, b, training=True, momentum=0.3)
        torch.testing.assert_close(y, ty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, trm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, trv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_is_stable_in_float32(backend):
    """x + 1e4 in float32: no E[x^2] - E[x]^2 cancellation (that would lose the variance entirely)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 4, 6, 6, generator=g) + 1e4).float()
    y, mean, invstd, _ = F.batch_norm_train(x, None, None, eps=1e-5, backend=backend)
    var_biased = invstd.double() ** -2 - 1e-5
    ref = R.batch_norm_train(x.double().numpy(), np.ones(4), np.zeros(4), eps=1e-5)
    # float32 represents x only to |x| * eps32; y can be no closer than that in units of std.
    y_tol = 8 * FLOAT32_EPS * 1e4 / np.sqrt(ref["sigma2_B"].min())
    assert np.max(np.abs(y.double().numpy() - ref["y"])) < y_tol
    assert rel_err(var_biased, ref["sigma2_B"]) < 1e-3
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # the formula we must not use
    assert rel_err(naive, ref["sigma2_B"]) > 1e-2


@pytest.mark.parametrize("backend", ["native", "autograd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_use_float32_statistics(backend, dtype):
    x, w, b, dy = make((16, 3, 4, 4))
    xl = x.to(dtype)
    y, mean, invstd, _ = F.batch_norm_train(xl, w.float(), b.float(), backend=backend)
    assert y.dtype == dtype and mean.dtype == torch.float32 and invstd.dtype == torch.float32
    var_biased = invstd.double() ** -2 - 1e-5
    ref = R.batch_norm_train(xl.double().numpy(), w.numpy(), b.numpy())
    assert rel_err(mean, ref["mu_B"]) < 1e-5
    assert rel_err(var_biased, ref["sigma2_B"]) < 1e-5
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(y, ref["y"]) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_non_finite_batch_leaves_buffers_untouched(backend, bad):
    x = torch.randn(6, 3, 2)
    x[1, 2, 0] = bad
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    before = rm.clone(), rv.clone()
    *_, folded = F.batch_norm_train(x, None, None, 1e-5, backend, rm, rv, 0.1)
    assert not folded
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    *_, folded = F.batch_norm_train(torch.randn(6, 3, 2), None, None, 1e-5, backend, rm, rv, 0.1)
    assert folded and not torch.equal(rm, before[0])


def test_update_running_stats_skips_non_finite_batches():
    rm, rv = torch.zeros(2), torch.ones(2)
    assert F.update_running_stats_(rm, rv, torch.tensor([1.0, 2.0]), torch.tensor([4.0, 4.0]), 5, 0.5)
    torch.testing.assert_close(rm, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(rv, torch.tensor([0.5 + 0.5 * 5.0, 0.5 + 0.5 * 5.0]))
    before = rm.clone(), rv.clone()
    assert not F.update_running_stats_(rm, rv, torch.tensor([float("nan"), 0.0]), torch.ones(2), 5, 0.5)
    torch.testing.assert_close((rm, rv), before)


def test_fused_backend_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        F.batch_norm_train(torch.randn(4, 3, dtype=torch.float16), backend="fused")
    with pytest.raises(ValueError, match="act must be"):
        F.batch_norm_act_train(torch.randn(4, 3), act="gelu")


def test_bad_backend_and_single_value_errors():
    with pytest.raises(ValueError, match="backend"):
        F.batch_norm_train(torch.randn(4, 2), backend="cuda-magic")
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="needs running_mean"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)


@pytest.mark.parametrize("training", [True, False])
def test_vectors_of_the_wrong_length_are_refused_not_read_past(training):
    """torch.native_batch_norm takes a (4,) weight for 3 channels silently (a wrong output); torch's
    F.batch_norm checks in Python, and so does bnlab's."""
    x, ones, zeros = torch.randn(4, 3), torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\).*got \(4,\)"):
        F.batch_norm(x, zeros, ones, torch.ones(4), zeros, training=training)
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        F.batch_norm(x, zeros, torch.ones(2), training=training)
    if training:
        with pytest.raises(ValueError, match="momentum.*in \\[0, 1\\]; got 1.5"):
            F.batch_norm(x, zeros, ones, training=True, momentum=1.5)


def test_triton_by_name_on_a_cpu_tensor_says_what_it_needs(monkeypatch):
    """Triton's own error here was "0 active drivers ([]). There should only be one."."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install bnlab[triton])")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors .* got a tensor on cpu"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' runs on CUDA tensors"):
        bnlab.BatchNormAct2d(3, backend="triton")(torch.randn(4, 3, 2, 2))
