"""Stateless torch functions of Batch Normalization (Ioffe & Szegedy 2015).

This file owns the math in torch: per-channel batch statistics, the normalize/scale/shift step,
the compact backward formula, the running-statistics update, and ``batch_norm``, the drop-in twin
of ``torch.nn.functional.batch_norm``; then Batch Renorm's and ghost BN's steps, and cross-iteration
BN's derivatives and compensation, with the entry points of its CPU kernels. With
:mod:`bnlab.autograd` it is the only caller of the normalization kernels (the MNIST nets'
binary-input layer is :mod:`bnlab.nets`'). Names follow :mod:`bnlab.reference` (``mean`` is mu_B,
``var_biased`` is sigma2_B, ``invstd`` is 1/sqrt(sigma2_B + eps)) so every test pairs a function here
with its NumPy reference.

Conventions, stated once:
- statistics are per channel, dimension 1, over every other dimension (N * prod(spatial) values);
- the batch variance that normalizes is biased (divides by m); the running variance is unbiased
  (m/(m-1) times it), as in the paper's Algorithm 2 and in PyTorch;
- eps is added to the variance inside the square root;
- ``momentum`` is the weight of the new batch (PyTorch's convention; Keras' 0.99 is 0.01 here).
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

# Inputs of these dtypes are normalized with float32 statistics.
LOW_PRECISION = (torch.float16, torch.bfloat16)
BACKENDS = ("auto", "native", "autograd", "fused", "triton")
ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "sigmoid")


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    """The dimensions a per-channel statistic reduces over: all but dimension 1."""
    return (0, *range(2, x.dim()))


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a ``(C,)`` vector so it broadcasts against an ``ndim``-dimensional activation."""
    # (C,) -> (1, C, 1, ..., 1)
    return v.view(1, -1, *([1] * (ndim - 2)))


def values_per_channel(x: torch.Tensor) -> int:
    """m in the paper: how many values each channel's statistics are taken over."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ioffe & Szegedy 2015, Algorithm 1, lines 1-2: per-channel mean and biased variance.

    mu_B = 1/m sum x;  sigma2_B = 1/m sum (x - mu_B)^2.

    Two passes over the data: the deviations are taken from the mean before squaring, so a large
    common offset does not cancel catastrophically as E[x^2] - E[x]^2 would. Low-precision inputs
    are promoted to float32 first.

    Shape: ``x`` is ``(N, C, *)``; both results are ``(C,)``.
    """
    if x.dtype in LOW_PRECISION:
        x = x.float()
    dims = reduce_dims(x)
    mean = x.mean(dims)
    var_biased = (x - per_channel(mean, x.dim())).square().mean(dims)
    return mean, var_biased


def affine_or_identity(weight, bias, x: torch.Tensor, dtype: torch.dtype):
    """gamma and beta as the kernels take them: detached, or ones and zeros of ``dtype`` (on x's
    device) for a layer without an affine."""
    c = x.shape[1]
    w = weight.detach() if weight is not None else torch.ones(c, dtype=dtype, device=x.device)
    b = bias.detach() if bias is not None else torch.zeros(c, dtype=dtype, device=x.device)
    return w, b


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape hold the same values, NaN where NaN (exact equality, any
    dtypes compared as torch compares them)."""
    if a.shape != b.shape:
        return False
    equal = a == b
    if a.is_floating_point() and b.is_floating_point():
        equal |= a.isnan() & b.isnan()
    return bool(equal.all())


def normalize(x, mean, invstd, weight=None, bias=None):
    """Ioffe & Szegedy 2015, Algorithm 1, lines 3-4: y = gamma * (x - mu) * invstd + beta.

    The deviation ``x - mu`` is formed before scaling (stable for inputs with a large offset).
    The result has the dtype of ``x``; the arithmetic runs in the dtype of the statistics.
    """
    nd = x.dim()
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    x_hat = x.to(mean.dtype) - per_channel(mean, nd)
    if bias is None:
        y = x_hat * per_channel(scale, nd)
    else:
        y = torch.addcmul(per_channel(bias.to(mean.dtype), nd), x_hat, per_channel(scale, nd))
    return y.to(x.dtype)


def batch_norm_backward(dy, x, mean, invstd, weight=None, backend="autograd"):
    """Ioffe & Szegedy 2015, section 3, in compact form (the printed formulas with sums folded).

    With x_hat = (x - mu_B) * invstd over m values per channel:
        dl/dbeta  = sum dy
        dl/dgamma = sum dy * x_hat
        dl/dx     = gamma * invstd / m * (m * dy - dl/dbeta - x_hat * dl/dgamma)

    The last line is the paper's dl/dx after substituting dl/dsigma2 and dl/dmu (whose second term
    vanishes because the deviations sum to zero).

    ``backend="native"`` hands the same formula to PyTorch's fused ATen kernel (one call, for
    hand-written training steps of small networks where the number of ops is the cost).

    Returns:
        ``(dx, dgamma, dbeta)``; ``dx`` has the dtype of ``x``.
    """
    if backend == "native":
        return torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
    nd = x.dim()
    dims = reduce_dims(x)
    m = values_per_channel(x)
    dy = dy.to(mean.dtype)
    x_hat = (x.to(mean.dtype) - per_channel(mean, nd)) * per_channel(invstd, nd)
    dbeta = dy.sum(dims)
    dgamma = (dy * x_hat).sum(dims)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    dx = per_channel(scale / m, nd) * (
        m * dy - per_channel(dbeta, nd) - x_hat * per_channel(dgamma, nd)
    )
    return dx.to(x.dtype), dgamma, dbeta


def statistics_sum(mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """sum over channels of mu + sigma, not finite when the batch held a NaN or inf: it reaches the
    mean, or makes the variance infinite (invstd 0) or NaN. One reduction: a non-finite term makes
    the whole sum non-finite."""
    return (mean + invstd.reciprocal()).sum()


@torch.no_grad()
def update_running_stats_(running_mean, running_var, mean, var_biased, m, momentum) -> bool:
    """Fold one batch into the running statistics, in place; skip a batch with non-finite stats.

    running_mean <- (1 - momentum) * running_mean + momentum * mu_B
    running_var  <- (1 - momentum) * running_var  + momentum * m / (m - 1) * sigma2_B

    ``momentum`` is the new batch's weight; ``1 / count`` gives the cumulative (equal-weight)
    average. A batch whose mean or variance is not finite is not folded in, so one bad batch
    cannot poison the running statistics for the rest of training.

    Returns:
        True when the batch was folded in, False when it was skipped.
    """
    correction = 1.0 if m is None else m / (m - 1)  # m=None: var_biased is already unbiased
    mean, var_biased = mean.to(running_mean.dtype), var_biased.to(running_var.dtype)
    if isinstance(momentum, torch.Tensor):  # (1/t under torch.compile: BatchNorm.batch_weight)
        updated = (running_mean.lerp(mean, momentum.to(running_mean.dtype)),
                   running_var.lerp(var_biased * correction, momentum.to(running_var.dtype)))
    else:
        updated = (running_mean.lerp(mean, momentum),
                   running_var.mul(1.0 - momentum).add(var_biased, alpha=momentum * correction))
    # (checked in the buffers' dtype: a float64 variance may overflow float32)
    return fold_if_finite_(mean.sum() + var_biased.sum() * correction, (running_mean, running_var), updated)


def fold_if_finite_(total: torch.Tensor, buffers, updated) -> "bool | torch.Tensor":
    """buffers <- updated (the running statistics with the batch folded in), in place, when
    ``total`` (a sum over the batch's statistics) is finite; else unchanged. Returns whether they
    were folded in. (The buffers and ``updated`` need no gradient: it is not disabled here, on the
    hot path.)

    Eagerly the sum is read on the host. Traced by torch.compile, that read would break the graph at
    every normalization layer: there each buffer takes ``torch.where(finite, updated, buffer)`` and
    the result is the 0-d bool tensor (no warning without the host read; a skipped batch shows as
    one batch fewer in ``num_batches_tracked``).
    """
    if torch.compiler.is_compiling():
        finite = torch.isfinite(total)
        for buffer, new in zip(buffers, updated):
            buffer.copy_(torch.where(finite, new, buffer))
        return finite
    if not math.isfinite(float(total)):
        return False
    for buffer, new in zip(buffers, updated):
        buffer.copy_(new)
    return True


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``, either mode) recomputing a segment to get the tensors its backward
    needs. The layers then give the output of the forward being recomputed and change no state.
    (torch's BN folds the batch into its running statistics a second time there:
    pytorch/pytorch#96136.) Never inside code that torch.compile traces: a compiled backward
    does not run the modules' forwards."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def transformed() -> bool:
    """Whether this forward runs under one of torch.func's transforms (``grad``, ``vmap``, ``jvp``,
    ``jacrev``, ``functional_call`` inside them: MAML, model ensembles) or inside a forward-mode AD
    level (``torch.autograd.forward_ad.dual_level``). bnlab's kernels (numba, Triton) and their
    autograd functions are opaque to those: there the layers compute with torch's kernels and
    differentiable torch ops, which the transforms see through, as torch's BN does."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def check_untransformed(backend: str) -> None:
    """A kernel backend asked for by name under :func:`transformed`: say why it cannot run there."""
    if transformed():
        raise ValueError(f"backend={backend!r} runs bnlab's own kernels, which torch.func's transforms and "
                         "forward-mode AD cannot see through; use backend='auto' (torch's kernels there) or "
                         "'native'")


def batch_key(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's per-channel mean and biased variance in float64: how a layer finds, when
    :func:`recomputing`, the record of the forward that normalized this batch."""
    x = x.detach().double()
    var, mean = torch.var_mean(x, reduce_dims(x), correction=0)
    return mean, var


def same_batch(mean, var, other_mean, other_var, eps: float, rtol: float = 1e-5) -> bool:
    """Whether two batches' per-channel statistics (tensors or NumPy arrays, any float dtype) agree
    to ``rtol`` of each channel's sqrt(mu^2 + sigma2 + eps): the same values, up to how each was
    summed (and a variance read back from 1/sqrt(sigma2 + eps) is known to about rtol (sigma2 + eps):
    a constant channel's is not exactly 0). Two different batches differ by about sigma / sqrt(m)
    in their means."""
    mean, var = mean.double(), var.double()
    other_mean, other_var = (torch.as_tensor(t).to(mean.device, torch.float64) for t in (other_mean, other_var))
    if other_mean.shape != mean.shape:
        return False
    second = mean * mean + var  # (the second moment: what rounding in E[x^2] - mu^2 is relative to)
    scale = second + eps
    return bool(((mean - other_mean).abs() <= rtol * scale.sqrt()).all()
                and ((second - other_mean * other_mean - other_var).abs() <= rtol * scale).all())


def working_copies(running_mean: torch.Tensor, running_var: torch.Tensor, x: torch.Tensor):
    """Copies of the running statistics for a kernel that updates them in place and keeps them for
    its backward; :func:`fold_if_finite_` copies them back only for a finite batch. (Undoing the
    update in the buffers themselves bumped their version, and the backward of a NaN batch failed
    autograd's check.) In x's dtype where that is wider: float32 statistics of a layer converted to
    bfloat16 (cross-iteration BN computes in float32) go to the kernel as float32, which torch's CPU
    kernel requires of a float32 input."""
    dtype = torch.promote_types(running_mean.dtype, x.dtype)
    return running_mean.to(dtype, copy=True), running_var.to(dtype, copy=True)


def kernel_momentum(momentum: "float | torch.Tensor") -> float:
    """The momentum for a kernel that folds the batch into :func:`working_copies`: ``momentum``, or 1
    for a 0-d tensor (the cumulative average's 1/t under torch.compile, which read on the host would
    break the graph): the copies then hold the batch's mean and unbiased variance, and
    :func:`fold_copies_` averages them in with the tensor."""
    return 1.0 if isinstance(momentum, torch.Tensor) else momentum


def fold_copies_(running_mean, running_var, copies, momentum, mean, invstd) -> "bool | torch.Tensor":
    """The running statistics <- a kernel's :func:`working_copies` (after :func:`kernel_momentum`),
    for a finite batch only (:func:`fold_if_finite_`: a bad batch must not poison the buffers);
    with a tensor ``momentum`` the copies are averaged in with it first."""
    if isinstance(momentum, torch.Tensor):
        copies = tuple(r.lerp(c.to(r.dtype), momentum.to(r.dtype)) for r, c in zip((running_mean, running_var), copies))
    return fold_if_finite_(statistics_sum(mean, invstd), (running_mean, running_var), copies)


def batch_norm_train(
    x, weight=None, bias=None, eps=1e-5, backend="auto", running_mean=None, running_var=None, momentum=0.1
):
    """Algorithm 1 over a batch, and the running-statistics update when buffers are given.

    Returns:
        ``(y, mean, invstd, folded)``: the output (differentiable in x, weight and bias), the
        batch's mean and 1/sqrt(sigma2_B + eps) per channel, and whether the batch was folded
        into the running buffers (False when there are none or its statistics are not finite,
        in which case the buffers are left exactly as they were). The update is the one
        :func:`update_running_stats_` states.

    Backends (both compared against :mod:`bnlab.reference` in the tests):
    - ``"autograd"``: bnlab's :class:`bnlab.autograd.BatchNormFunction`, the paper's formulas with a
      hand-written backward;
    - ``"native"``: PyTorch's fused ATen kernels (``torch.native_batch_norm``, which also updates
      the buffers in the same pass), the fastest correct path on the CPU;
    - ``"fused"``: bnlab's compiled CPU kernels (:mod:`bnlab.kernels.cpu_fused`; float32/float64;
      a gradient of the gradient by autograd through torch ops); for BN alone they do not beat
      ``"native"`` (benchmarks/RESULTS.md), their use is BN fused with an activation
      (:func:`batch_norm_act_train`);
    - ``"triton"``: the Triton kernels of :mod:`bnlab.kernels.triton_bn` (one launch a direction);
    - ``"auto"``: ``"triton"`` for CUDA tensors when Triton is importable (not float64 ones: the
      kernels compute in float32), else ``"native"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    tracking = running_mean is not None and running_var is not None
    if backend in ("fused", "triton") or (backend == "auto" and use_triton(x)):
        return batch_norm_act_train(x, weight, bias, eps, "identity", 0.0, backend, running_mean, running_var, momentum)
    if backend == "autograd":
        check_untransformed(backend)
        from bnlab.autograd import BatchNormFunction  # autograd builds on this module

        y, mean, var_biased = BatchNormFunction.apply(x, weight, bias, eps)
        folded = tracking and update_running_stats_(
            running_mean, running_var, mean, var_biased, values_per_channel(x), momentum
        )
        return y, mean, torch.rsqrt(var_biased + eps), folded
    updated = working_copies(running_mean, running_var, x) if tracking else (None, None)
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, *updated, True, kernel_momentum(momentum), eps)
    mean, invstd = mean.detach(), invstd.detach()
    if not tracking:
        return y, mean, invstd, False
    return y, mean, invstd, fold_copies_(running_mean, running_var, updated, momentum, mean, invstd)


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, backend="auto"):
    """Ioffe & Szegedy 2015, Algorithm 2, line 11: y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta.

    (``torch.batch_norm``, as torch's layers call it, not the native kernel it dispatches to on the
    CPU: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter, knows only the former.)
    """
    if backend != "autograd":
        return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    stat_dtype = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
    invstd = torch.rsqrt(running_var.to(stat_dtype) + eps)
    return normalize(x, running_mean.to(stat_dtype), invstd, weight, bias)


def batch_norm_act_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, act="relu", slope=0.01,
                        backend="auto"):
    """act(Algorithm 2's output): act(gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta).

    On the Triton path (``backend="triton"``, or ``"auto"`` where :func:`use_triton` takes it)
    with no autograd graph to build (under ``torch.no_grad()`` or ``torch.inference_mode()``, or
    nothing requiring a gradient), one elementwise pass with the folded scale
    s = gamma / sqrt(Var[x] + eps) and shift beta - E[x] s (:func:`bnlab.kernels.triton_bn.inference`),
    in float32 whatever x's dtype.
    Otherwise, and under torch.compile (whose own fusion takes the two ops), :func:`batch_norm_eval`
    then the activation, which autograd differentiates.

    Example:
        >>> x = torch.randn(8, 4, 5, 5)
        >>> y = batch_norm_act_eval(x, torch.zeros(4), torch.ones(4), act="relu")  # relu(x / sqrt(1 + eps))
    """
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if takes_triton(x, backend) and not graph and not torch.compiler.is_compiling():
        from bnlab.kernels import triton_bn

        return triton_bn.inference(x, *affine_or_identity(weight, bias, x, torch.float32), running_mean, running_var,
                                   eps, act, slope)
    return activation(batch_norm_eval(x, running_mean, running_var, weight, bias, eps, backend), act, slope)


def state_dtype(*tensors: "torch.Tensor | None") -> "torch.dtype | None":
    """The dtype of a layer's state, the first of ``tensors`` (its parameters, then its running
    statistics) that it has: what :func:`check_input` holds the input's dtype to. None without any."""
    return next((t.dtype for t in tensors if t is not None), None)


def check_input(x: torch.Tensor, num_features: int, training: bool, name="batch_norm", *, running_stats=True,
                state_dtype: "torch.dtype | None" = None):
    """Raise a ValueError (a TypeError for a dtype) that says what is wrong and what to do, before
    any arithmetic.

    ``name`` (a string, or a function giving one when an error is raised) names the layer. A layer
    without ``running_stats`` normalizes with batch statistics in inference too, so one value per
    channel is refused there as well (it would come out as beta, whatever the input).
    ``state_dtype``: the dtype of the layer's parameters or running statistics, which the input's
    must equal, but for a float16/bfloat16 input with float32 state (autocast, as torch's kernels
    take it): checked the same way in training and in inference."""
    def label() -> str:
        return name() if callable(name) else name

    if x.dim() < 2:
        raise ValueError(f"{label()}: expected an input of shape (N, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{label()}: expected a floating-point input (float16, bfloat16, float32 or float64), got "
                        f"{x.dtype}; convert it first (x.float(): images as uint8, tokens as int64?)")
    if state_dtype is not None and x.dtype != state_dtype and not (
            state_dtype == torch.float32 and x.dtype in LOW_PRECISION):
        raise TypeError(f"{label()}: the input is {x.dtype}, the layer's parameters and running statistics "
                        f"{state_dtype}; convert one to the other (model.to({x.dtype}), or the input "
                        f"x.to({state_dtype})). Float16/bfloat16 inputs are taken with float32 state (autocast)")
    if x.shape[1] != num_features:
        raise ValueError(
            f"{label()}: expected {num_features} channels in dimension 1, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)}); channels-first layout (N, C, ...) is required"
        )
    if (training or not running_stats) and values_per_channel(x) == 1:  # (an empty batch passes: empty_batch)
        if training:
            why, fix = "training needs", "Use eval() for inference on one example"
        else:
            why = ("with track_running_stats=False it normalizes with batch statistics in eval() too, which "
                   "need")
            fix = "Keep running statistics (track_running_stats=True) for inference on one example"
        raise ValueError(
            f"{label()}: {why} more than one value per channel to estimate a variance, got input "
            f"shape {tuple(x.shape)} (1 value per channel). {fix}, "
            "a larger batch, or a normalizer without batch statistics (torch.nn.GroupNorm, torch.nn.LayerNorm)"
        )


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    backend="auto",
):
    """Batch Normalization with the signature and semantics of ``torch.nn.functional.batch_norm``.

    Training (``training=True``): normalize with the batch's mean and biased variance (Algorithm 1)
    and, when running buffers are given, update them in place with ``momentum`` as the new batch's
    weight and the unbiased variance: r <- (1 - momentum) * r + momentum * stat. Inference: normalize
    with the running buffers (Algorithm 2).

    Args:
        input: ``(N, C)`` or ``(N, C, *spatial)``.
        running_mean, running_var: ``(C,)`` buffers or None.
        weight, bias: ``(C,)`` gamma and beta, or None.
        backend: see :func:`batch_norm_train`.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = batch_norm(x, None, None, training=True)
        >>> torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-6)
        True
    """
    c = input.shape[1] if input.dim() > 1 else 0
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if v is not None and tuple(v.shape) != (c,):  # (torch's native kernel would read past or short)
            raise ValueError(f"batch_norm: {name} must have shape ({c},), one value per channel of the input "
                             f"{tuple(input.shape)}; got {tuple(v.shape)}")
    if training and running_mean is not None and (momentum is None or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"batch_norm: momentum is the new batch's weight in the running average, in [0, 1]; "
                         f"got {momentum}" + (" (the cumulative average needs the batch count that the layers "
                                              "keep: bnlab.BatchNorm*(momentum=None))" if momentum is None else ""))
    momentum = 0.0 if momentum is None else momentum  # (no running statistics to update: unused)
    check_input(input, c, training, state_dtype=state_dtype(weight, running_mean))
    if training:
        if input.numel() == 0:
            return empty_batch(input, weight, bias)
        return batch_norm_train(input, weight, bias, eps, backend, running_mean, running_var, momentum)[0]
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: inference (training=False) needs running_mean and running_var")
    return batch_norm_eval(input, running_mean, running_var, weight, bias, eps, backend)


def empty_batch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Training on an empty batch (N = 0), as torch does it: an empty output that is still part of
    the autograd graph (weight and bias get zero gradients). There are no statistics to fold in."""
    if weight is None:
        return x.clone()
    return x * per_channel(weight.to(x.dtype), x.dim()) + per_channel(bias.to(x.dtype), x.dim())


def activation(u: torch.Tensor, act: str, slope: float = 0.01) -> torch.Tensor:
    """The activation that follows BN: identity, ReLU, leaky ReLU (``slope``), SiLU or sigmoid."""
    if act == "relu":
        return torch.relu(u)
    if act == "leaky_relu":
        return torch.nn.functional.leaky_relu(u, slope)
    if act == "silu":
        return torch.nn.functional.silu(u)
    if act == "sigmoid":
        return torch.sigmoid(u)
    return u


FUSED_MIN_NUMEL = 1 << 16  # below this, torch's kernels win on call overhead (benchmarks/RESULTS.md)


TRITON_MAX_NUMEL = 2**31 - 1  # the kernels index in int32 (offsets up to numel)


def use_triton(x: torch.Tensor) -> bool:
    """``backend="auto"``'s choice of the Triton kernels: CUDA tensors that int32 offsets can
    address, when Triton is importable (else torch's kernels). Not float64: the kernels compute in
    float32, and a float64 model (a gradcheck, say) wants float64 arithmetic, which torch's have."""
    if x.device.type != "cuda" or x.numel() > TRITON_MAX_NUMEL or x.dtype == torch.float64 or transformed():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def takes_triton(x: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` runs ``x`` on the Triton kernels: by name (after :func:`check_triton`,
    which says why it cannot), or ``"auto"`` where :func:`use_triton` takes it."""
    if backend == "triton":
        check_triton(x)
        return True
    return backend == "auto" and use_triton(x)


def check_triton(x: torch.Tensor) -> None:
    """``backend="triton"`` asked for by name: say why it cannot run here, before Triton's own error
    (on a CPU tensor: "0 active drivers")."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise ValueError("backend='triton' needs Triton: pip install 'bnlab[triton]'") from err
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for "
                         f"tests), got a tensor on {x.device}; backend='auto' picks the fastest available")
    check_untransformed("triton")
    if x.numel() > TRITON_MAX_NUMEL:
        raise ValueError(f"backend='triton' addresses tensors of up to 2^31 - 1 values (int32 offsets), got "
                         f"{x.numel()} ({tuple(x.shape)}); backend='auto' runs torch's kernels on it")


# Activations the fused CPU kernels win on. SiLU and sigmoid need exp, which numba computes one
# value at a time (no vector math library here), and measured 0.4-0.5x torch's speed on most shapes
# (benchmarks/RESULTS.md); plain BN stays with torch's kernels too. backend="fused" still runs them.
FUSED_AUTO_ACTS = ("relu", "leaky_relu")


def use_fused(x: torch.Tensor, act: str) -> bool:
    """``backend="auto"``'s choice of the fused CPU kernels for act(BN(x)): inputs with a spatial
    extent, channels-first or channels_last. On (N, C) inputs (and (N, C, 1, 1)) the layer around
    the row kernels measured 0.3-0.8x torch's speed (``bench_bn_act.py --shapes 256x1024``)."""
    if not (act in FUSED_AUTO_ACTS and fused_act_supported(x) and x.numel() >= FUSED_MIN_NUMEL) or flat_rows(x):
        return False
    if transformed():
        return False
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


FUSED_DTYPES = (torch.float32, torch.float64)  # what bnlab's numba kernels take


def fused_act_supported(x: torch.Tensor) -> bool:
    """Whether bnlab's fused CPU kernels take ``x``: float32/float64 CPU tensors of rank 2 to 5."""
    return x.device.type == "cpu" and x.dtype in FUSED_DTYPES and 2 <= x.dim() <= 5


def flat_rows(x: torch.Tensor) -> bool:
    """One value per example and channel: ``(N, C)``, or ``(N, C, 1, ...)``."""
    return x.numel() == x.shape[0] * x.shape[1]


def row_layout(x: torch.Tensor) -> bool:
    """Whether the fused CPU kernels see ``x`` as rows ``(M, C)``: :func:`flat_rows` inputs and
    channels_last memory; otherwise channels-first ``(N, C, S)``."""
    return flat_rows(x) or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                            and not x.is_contiguous())


def batch_norm_act_train(
    x, weight=None, bias=None, eps=1e-5, act="relu", slope=0.01, backend="auto",
    running_mean=None, running_var=None, momentum=0.1,
):
    """act(BN(x)) in training mode, and the running update: returns ``(y, mean, invstd, folded)``.

    ``backend="fused"`` (or ``"auto"``, for an activation other than identity on large enough
    float32/float64 CPU tensors): the fused kernels on the CPU
    (:class:`bnlab.autograd.BatchNormActFunction`); otherwise :func:`batch_norm_train` with that
    backend followed by the activation as a torch op. The running update is
    :func:`update_running_stats_`'s in every case (on the fused path, the same update in one numba
    call: :func:`bnlab.kernels.cpu_fused.fold_running`).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if backend == "fused":
        if not fused_act_supported(x):
            raise ValueError(f"backend='fused' takes float32/float64 CPU tensors, got {x.dtype} on {x.device}")
        check_untransformed(backend)
    if takes_triton(x, backend):
        from bnlab.autograd import TritonBatchNormActFunction  # autograd builds on this module

        tracking = running_mean is not None and running_var is not None
        updated = working_copies(running_mean, running_var, x) if tracking else (None, None)
        y, mean, invstd = TritonBatchNormActFunction.apply(x, weight, bias, eps, act, slope, *updated,
                                                           kernel_momentum(momentum))
        if not tracking:
            return y, mean, invstd, False
        return y, mean, invstd, fold_copies_(running_mean, running_var, updated, momentum, mean, invstd)
    if backend == "fused" or (backend == "auto" and use_fused(x, act)):
        return _fused_act_train(x, weight, bias, eps, act, slope, running_mean, running_var, momentum)
    y, mean, invstd, folded = batch_norm_train(
        x, weight, bias, eps, backend, running_mean, running_var, momentum
    )
    return activation(y, act, slope), mean, invstd, folded


def eager_under_compile(fn):
    """``fn``, run eagerly inside code that torch.compile traces (a graph break there), for code
    dynamo cannot trace: numba kernels on NumPy views, or in-place updates a compiled backward
    would read. Outside torch.compile it costs one check instead of torch.compiler.disable's
    wrapper on every call."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return disabled(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

    return call


@eager_under_compile  # (numba kernels: dynamo cannot trace them)
def _fused_act_train(x, weight, bias, eps, act, slope, running_mean, running_var, momentum):
    """:func:`batch_norm_act_train` on the fused CPU kernels."""
    from bnlab.autograd import BatchNormActFunction  # autograd builds on this module

    y, mean, invstd = BatchNormActFunction.apply(x, weight, bias, eps, act, slope)
    folded = False
    if running_mean is not None and running_var is not None:
        var_biased = invstd.reciprocal().square() - eps
        buffers = (running_mean, running_var)
        if all(t.is_cpu and t.dtype in FUSED_DTYPES for t in buffers):  # one numba call, not a dozen torch ops
            from bnlab.kernels import cpu_fused

            folded = cpu_fused.fold_running(mean.numpy(), var_biased.numpy(), values_per_channel(x),
                                            running_mean.numpy(), running_var.numpy(), float(momentum))
        else:
            folded = update_running_stats_(
                running_mean, running_var, mean, var_biased, values_per_channel(x), momentum
            )
    return y, mean.to(running_mean.dtype if running_mean is not None else x.dtype), invstd, folded


def renorm_limits(step: int, r_max: float, d_max: float, warmup: int, r_max_steps: int, d_max_steps: int):
    """Ioffe 2017's schedule at ``step`` (from 0): (r_max, d_max) = (1, 0) for the first ``warmup``
    steps, then relaxed linearly to ``r_max`` at step ``r_max_steps`` and ``d_max`` at
    ``d_max_steps`` (paper: 5k, 40k, 25k); a limit whose step is not past ``warmup`` is reached
    at once (``warmup=0, r_max_steps=0, d_max_steps=0``: no schedule)."""

    def ramp(target, start_value, end_step):
        if step < warmup:
            return start_value
        if end_step <= warmup:
            return target
        return start_value + (target - start_value) * min(1.0, (step - warmup) / (end_step - warmup))

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


def batch_renorm_train(x, weight, bias, running_mean, running_std, r_max, d_max, eps=1e-5, momentum=0.01):
    """Ioffe 2017, Batch Renormalization, training; returns ``(y, mean, invstd, folded)`` as
    :func:`batch_norm_train` does (the batch's mean and 1/sigma_B, without gradient).

    sigma_B = sqrt(sigma2_B + eps), r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mu_B - mu) / sigma, -d_max, d_max), y = gamma * ((x - mu_B) / sigma_B * r + d) + beta,
    with r and d constants in backprop (so the gradient is BN's, scaled by r). Then the moving mean
    and standard deviation move toward the batch's: mu <- mu + momentum (mu_B - mu),
    sigma <- sigma + momentum (sigma_B - sigma) (skipped for a non-finite batch).
    """
    nd = x.dim()
    x_hat, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    with torch.no_grad():
        mean, sigma_B = mean.detach(), invstd.detach().reciprocal()
        r = (sigma_B / running_std).clamp(1.0 / r_max, r_max)
        d = ((mean - running_mean) / running_std).clamp(-d_max, d_max)
    y = x_hat * per_channel(r.to(x.dtype), nd) + per_channel(d.to(x.dtype), nd)
    if weight is not None:
        y = y * per_channel(weight.to(y.dtype), nd) + per_channel(bias.to(y.dtype), nd)
    with torch.no_grad():
        folded = fold_if_finite_(statistics_sum(mean, invstd), (running_mean, running_std),
                                 (running_mean.lerp(mean.to(running_mean.dtype), momentum),
                                  running_std.lerp(sigma_B.to(running_std.dtype), momentum)))
    return y, mean, invstd.detach(), folded


def batch_renorm_eval(x, weight, bias, running_mean, running_std):
    """Batch Renormalization inference: y = gamma * (x - mu) / sigma + beta (eps is inside sigma)."""
    nd = x.dim()
    y = (x - per_channel(running_mean.to(x.dtype), nd)) / per_channel(running_std.to(x.dtype), nd)
    if weight is not None:
        y = y * per_channel(weight.to(y.dtype), nd) + per_channel(bias.to(y.dtype), nd)
    return y


def check_virtual_batch_size(virtual_batch_size) -> int:
    """Ghost BN's sub-batch size as an int: an integer of at least 1, a NumPy one too (the layer's
    check of its setting, and :func:`ghost_batch_norm_train`'s of its argument)."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral) \
            or virtual_batch_size < 1:
        raise ValueError(f"ghost batch norm: virtual_batch_size must be an integer of at least 1, "
                         f"got {virtual_batch_size!r}")
    return int(virtual_batch_size)


def ghost_batch_norm_train(x, weight, bias, virtual_batch_size, eps=1e-5, backend="auto"):
    """Ghost BN: Algorithm 1 on consecutive sub-batches of ``virtual_batch_size`` examples.

    Returns ``(y, mean, var_unbiased)``, the last two averaged over the sub-batches (each variance
    unbiased with its own m/(m-1)): what the running statistics fold in.
    """
    virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    n, last = x.shape[0], x.shape[0] % virtual_batch_size
    if last and last * values_per_channel(x[:1]) < 2:
        raise ValueError(f"ghost batch norm: a batch of {n} in virtual batches of {virtual_batch_size} leaves a last "
                         f"virtual batch of {last} example(s), 1 value per channel, whose variance cannot be "
                         "estimated; use a batch size that leaves none or at least 2 (DataLoader(drop_last=True) "
                         "for a short last batch), or eval() for inference")
    outs, means, variances = [], [], []
    for chunk in torch.split(x, virtual_batch_size):
        check_input(chunk, x.shape[1], True, "ghost batch norm (a virtual batch)")
        y, mean, invstd, _ = batch_norm_train(chunk, weight, bias, eps, backend)
        m = values_per_channel(chunk)
        outs.append(y)
        means.append(mean)
        variances.append((invstd.double() ** -2 - eps).clamp_min(0) * (m / (m - 1)))
    return torch.cat(outs), torch.stack(means).mean(0), torch.stack(variances).mean(0).to(means[0].dtype)


def producer_statistics(x: torch.Tensor, u: torch.Tensor, producer: torch.nn.Module):
    """Yao et al. 2020: a BN input's moments and their derivatives with respect to its producer.

    ``x`` is the producer's output ``(N, C, *)``, ``u`` its input. Channel j depends only on row j
    of the producer's weight, so each derivative is weight-shaped, row j holding d stat_j / d W_j:
        d mu_j / d W_j = the mean input patch (Linear: the mean input row)
        d nu_j / d W_j = 2 E[x_j * patch]     (one weight-gradient-shaped reduction)
    Linear and Conv2d (any stride, padding and padding mode, dilation, groups) producers.

    Returns:
        ``(mu, nu, dmu_dW, dnu_dW)``: mean and second moment ``(C,)`` (differentiable in x), then
        the two weight-shaped derivatives (constants).
    """
    dims = reduce_dims(x)
    mu = x.mean(dims)
    nu = x.square().mean(dims)
    return (mu, nu, *producer_derivatives(x, u, producer))


@torch.no_grad()
def producer_derivatives(x: torch.Tensor, u: torch.Tensor, producer: torch.nn.Module):
    """The weight-shaped ``(d mu / d W, d nu / d W)`` of :func:`producer_statistics`.

    Row j of d mu / d W is the mean patch of channel j's group (:func:`mean_patches`, repeated over
    the group's channels); d nu / d W is :func:`second_moment_derivative`.
    """
    w = producer.weight
    g = getattr(producer, "groups", 1)
    patches = mean_patches(u, producer)  # (G, F) -> (G, C/G, F) -> weight-shaped
    dmu = patches[:, None].expand(g, w.shape[0] // g, patches.shape[1]).reshape(w.shape)
    return dmu, second_moment_derivative(x, u, producer)


def _check_producer(x: torch.Tensor, producer: torch.nn.Module) -> None:
    if isinstance(producer, torch.nn.Linear):
        if x.dim() != 2:
            raise ValueError("cross-iteration BN after a Linear layer takes (N, C) activations")
    elif not isinstance(producer, torch.nn.Conv2d):
        raise TypeError(f"cross-iteration BN needs a Linear or Conv2d producer, got {type(producer).__name__}")


@torch.no_grad()
def is_plain_producer(producer: torch.nn.Module, u: torch.Tensor, output: torch.Tensor) -> bool | None:
    """Whether ``output`` is ``producer``'s Linear or Conv2d of ``u`` by ``producer.weight`` and
    ``producer.bias``, to 1% of its scale (low precision, a parametrization that moves on each
    read such as spectral norm's power iteration): what cross-iteration BN's derivatives assume.
    A subclass whose forward transforms the weight (weight standardization) fails it. None when
    nothing finite can be compared."""
    weight = producer.weight.detach()
    bias = producer.bias.detach() if producer.bias is not None else None
    u = u.to(weight.dtype)
    if isinstance(producer, torch.nn.Linear):
        ref = torch.nn.functional.linear(u, weight, bias)
    else:
        ref = torch.nn.functional.conv2d(conv_input(u, producer), weight, bias, producer.stride,
                                         conv_padding(producer), producer.dilation, producer.groups)
    out = output.detach().to(ref.dtype)
    if out.shape != ref.shape:
        return False
    finite = torch.isfinite(out) & torch.isfinite(ref)
    if not bool(finite.any()):
        return None
    scale = float(ref[finite].abs().max())
    return bool(((out - ref).abs()[finite] <= 0.01 * scale + 1e-6).all())


def computed_weight(module: torch.nn.Module) -> str | None:
    """How ``module``'s weight or bias (a producer's, or a normalization layer's gamma and beta) is
    made anew from other tensors, or None where both are tensors it keeps: a parametrization
    (``torch.nn.utils.parametrize``: the weight norm, spectral norm and orthogonal of
    ``torch.nn.utils.parametrizations``), computed on each read; or a forward pre-hook that sets
    the attribute before each forward from parameters of other names (``torch.nn.utils.prune``'s
    mask, the older forms of ``torch.nn.utils.weight_norm`` and ``spectral_norm``). A value folded
    into such a weight, or a view kept of it, does not last."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "a parametrization"
    params = module._parameters
    if params.get("weight") is not module.weight or params.get("bias") is not module.bias:
        return "set by a forward hook from other parameters (torch.nn.utils.prune, weight_norm or spectral_norm)"
    return None


def _pads_explicitly(conv: torch.nn.Conv2d) -> bool:
    return conv.padding_mode != "zeros" or isinstance(conv.padding, str)


def conv_padding(conv: torch.nn.Conv2d) -> tuple[int, int]:
    """The zero padding the convolution itself applies to :func:`conv_input`'s tensor."""
    return (0, 0) if _pads_explicitly(conv) else conv.padding


def conv_input(u: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A Conv2d's input as its convolution reads it, with :func:`conv_padding`.

    Padding modes other than zeros (reflect, replicate, circular) and the string paddings ("same",
    "valid", fixed amounts once the kernel is known, uneven for an even kernel) are padded here as
    torch's Conv2d pads them (``_reversed_padding_repeated_twice``). The output is still
    W * pad(u) + b, linear in W, so the derivatives are taken over the padded input's patches.
    """
    if not _pads_explicitly(conv):
        return u
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return torch.nn.functional.pad(u, conv._reversed_padding_repeated_twice, mode=mode)


@torch.no_grad()
def mean_patches(u: torch.Tensor, producer: torch.nn.Module) -> torch.Tensor:
    """d mu_j / d W_j, once per group of the producer: ``(G, F)``, F the fan-in of a group.

    For a Linear layer (one group) the mean input row; for a Conv2d the mean patch of each group's
    input channels. Patches are linear in the input, so the mean patch is the mean image's: one
    image is unfolded, not the batch.
    """
    if isinstance(producer, torch.nn.Linear):
        return u.mean(0, keepdim=True)
    _check_producer(u, producer)
    w = producer.weight
    mean_image = conv_input(u.mean(0, keepdim=True), producer)  # (padding is linear: the mean's is the pads' mean)
    patches = torch.nn.functional.unfold(mean_image, w.shape[2:], dilation=producer.dilation,
                                         padding=conv_padding(producer), stride=producer.stride)
    return patches.mean(2).view(producer.groups, -1)  # (1, C_in*kh*kw, L) -> (G, C_in/G*kh*kw)


@torch.no_grad()
def second_moment_derivative(x: torch.Tensor, u: torch.Tensor, producer: torch.nn.Module,
                             weight_gradient: torch.Tensor | None = None) -> torch.Tensor:
    """d nu_j / d W_j = 2 E[x_j * patch], weight-shaped: one weight-gradient-shaped reduction, the
    kernel that computes the producer's own weight gradient. ``weight_gradient``: a Conv2d's
    :func:`conv_weight_gradient` from x, when the caller took it already."""
    _check_producer(x, producer)
    m = values_per_channel(x)
    if isinstance(producer, torch.nn.Linear):
        # (C, in) = 2/m x^T u, computed as (u^T x)^T: with few rows, MKL's (C, N) @ (N, in) product
        # measured 9x slower than (in, N) @ (N, C) on our CPU (bench_cbn.py --parts).
        return u.t().mm(x.detach() * (2.0 / m)).t()
    if weight_gradient is None:
        weight_gradient = conv_weight_gradient(x, u, producer)
    return weight_gradient * (2.0 / m)


def conv_weight_gradient(g: torch.Tensor, u: torch.Tensor, producer: torch.nn.Conv2d) -> torch.Tensor:
    """sum over the batch and the output positions of g_j * patch, weight-shaped: the gradient a
    Conv2d's weight gets from ``g`` at its output, on torch's weight-gradient kernel alone, in the
    weight's dtype, float32 at least (under autocast the conv's output is float16/bfloat16, its
    input and weight not; a model converted whole has all three in low precision)."""
    _check_producer(g, producer)
    weight = producer.weight.detach()
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return torch.ops.aten.convolution_backward(
        g.detach().to(weight.dtype), conv_input(u.to(weight.dtype), producer), weight, None, producer.stride,
        conv_padding(producer),
        producer.dilation, False, (0, 0), producer.groups, (False, True, False))[1]


def compensation_terms(dmu: torch.Tensor, dnu: torch.Tensor, weight: torch.Tensor):
    """Per channel, the products <d mu_j / d W_j, W_j> and <d nu_j / d W_j, W_j> for k window entries.

    ``dmu`` ``(k, G, F)``: the mean patch of each of the producer's G groups (one row serves every
    output channel of its group; F = fan-in per group); ``dnu`` ``(k, C, F)``; ``weight`` the
    producer's ``(C, ...)`` weight. Returns two ``(k, C)`` in the weight's dtype (the layer passes
    it as float64: <d nu/dW, W> is of the size of mu^2, and the window takes differences of such
    products).
    """
    k, g, f = dmu.shape
    c = weight.shape[0]
    dmu, dnu = dmu.to(weight.dtype), dnu.to(weight.dtype)  # (the stored float32 values, summed in float64)
    # (G, k, F) @ (G, F, C/G) -> (G, k, C/G) -> (k, C): one product per group
    mu_term = torch.matmul(dmu.transpose(0, 1), weight.reshape(g, c // g, f).transpose(1, 2)).transpose(0, 1)
    mu_term = mu_term.reshape(k, c)
    nu_term = (dnu * weight.reshape(1, c, f)).sum(-1)
    return mu_term, nu_term


def compensated_window(mu_past, nu_past, dmu_past, dnu_past, dmu_w_past, dnu_w_past, b_past, w_now, b_now):
    """Yao et al. 2020, eq. 7-8: past statistics moved to the current weights (first-order Taylor).

        mu(W_t) ~ mu + <d mu/d W, W_t - W_tau> = mu + <d mu/d W, W_t> - <d mu/d W, W_tau>

    and the same for nu; the last products (``dmu_w_past``, ``dnu_w_past``, ``(k, C)``) were taken
    when the entry was stored, so the window keeps no copies of past weights. ``mu_past``,
    ``nu_past``, ``b_past`` ``(k, C)``; ``dmu_past`` ``(k, G, F)`` and ``dnu_past`` ``(k, C, F)`` as in
    :func:`compensation_terms`. A bias moves mu by db and nu by 2 mu db. Returns ``(mu, nu)``, ``(k, C)``.
    """
    mu_term, nu_term = compensation_terms(dmu_past, dnu_past, w_now)
    mu = mu_past + mu_term - dmu_w_past
    nu = nu_past + nu_term - dnu_w_past
    if b_now is not None:
        db = b_now.unsqueeze(0) - b_past
        mu = mu + db
        nu = nu + 2 * mu_past * db
    return mu, nu


def cross_iteration_pool(mu, nu, mu_past, nu_past):
    """Yao et al. 2020, eq. 9: mu_bar = mean of mu; nu_bar = mean of max(nu, mu^2); sigma2 = nu_bar - mu_bar^2.

    ``mu``/``nu`` are the current iteration's (gradients flow through them), ``mu_past``/``nu_past``
    ``(j, C)`` the valid compensated past entries (constants). Returns ``(mu_bar, sigma2_bar)``.
    """
    mus = torch.cat([mu.unsqueeze(0), mu_past.to(mu.dtype)])
    nus = torch.cat([torch.maximum(nu, mu * mu).unsqueeze(0), torch.maximum(nu_past, mu_past * mu_past).to(nu.dtype)])
    mu_bar = mus.mean(0)
    return mu_bar, (nus.mean(0) - mu_bar * mu_bar).clamp_min(0)


def cross_iteration_statistics(x, past_mu, past_nu, k: int):
    """Yao et al. 2020's pooled statistics, the window's part given: the batch's mean mu_B and biased
    variance sigma2_B, then mu_bar = (mu_B + past_mu) / k and sigma2_bar = nu_bar - mu_bar^2 with
    nu_bar = (sigma2_B + mu_B^2 + past_nu) / k (clipped at 0). ``past_mu``, ``past_nu`` ``(C,)``: the
    sums of the k - 1 compensated, clipped past entries (constants). The pooling runs in their
    dtype (float64: the window's), as nu_bar and mu_bar^2 are of the size of mu^2 and their
    difference would cancel in float32; mu_bar and sigma2_bar come back in the batch statistics'
    dtype. Differentiable in x."""
    mu, var = batch_stats(x)
    mu_wide = mu.to(past_mu.dtype)
    mu_bar = (mu_wide + past_mu) / k
    var_bar = ((var.to(past_mu.dtype) + mu_wide * mu_wide + past_nu) / k - mu_bar * mu_bar).clamp_min(0)
    return mu, var, mu_bar.to(mu.dtype), var_bar.to(mu.dtype)


def cross_iteration_normalize(x, weight, bias, past_mu, past_nu, k: int, eps: float):
    """y = gamma (x - mu_bar) / sqrt(sigma2_bar + eps) + beta with :func:`cross_iteration_statistics`,
    in differentiable torch ops: what the layer's autograd functions compute, as a graph (their
    backward for a gradient of a gradient; the layer's forward under torch.func's transforms).
    Returns ``(y, mu_B, sigma2_B)`` as :class:`bnlab.autograd.CrossIterationNormFunction` does, the
    batch's mean and biased variance detached."""
    mu, var, mu_bar, var_bar = cross_iteration_statistics(x, past_mu, past_nu, k)
    return normalize(x, mu_bar, torch.rsqrt(var_bar + eps), weight, bias), mu.detach(), var.detach()


def pooled_past_sums(stats, eps: float):
    """The window's part of a fused CBN forward's pooled statistics, from what it wrote (``stats``, a
    NumPy ``(5, C)`` float64 array: the batch's mean and variance, mu_bar, 1/sqrt(sigma2_bar + eps), k:
    :class:`bnlab.autograd.FusedCrossIterationNormFunction`): (sum of compensated mu, sum of
    max(nu, mu^2), k), as mu_bar = (mu + past mu) / k and sigma2_bar + mu_bar^2 = (nu + past nu) / k."""
    mean, var, mu_bar, invstd = stats[:4]
    k = int(stats[4, 0])
    nu_bar = 1.0 / (invstd * invstd) - eps + mu_bar * mu_bar
    return k * mu_bar - mean, k * nu_bar - (var + mean * mean), k


# Cross-iteration BN's training step on the CPU: the numba kernels of bnlab.kernels.cpu_cbn, on
# NumPy views of the layer's tensors that the layer keeps between steps (remaking them costs more
# than the kernels on a small batch).

MOMENTS_MAX_FAN_IN = 32  # beyond, the patches' products (and W S, C F^2) cost more than torch's reduction


def moments_pay(groups: int, fan_in: int, channels: int, stride_w: int) -> bool:
    """Whether :func:`bnlab.kernels.cpu_cbn.store_conv_moments` beats torch's weight-gradient kernel
    for a conv's d nu/dW: one group, a fan-in F of at most C and of at most ``MOMENTS_MAX_FAN_IN``,
    stride 1 along the width (``benchmarks/bench_cbn.py --moments`` times both on shapes on either
    side of each bound)."""
    return groups == 1 and fan_in <= min(channels, MOMENTS_MAX_FAN_IN) and stride_w == 1


class CrossIterationViews(NamedTuple):
    """What :mod:`bnlab.kernels.cpu_cbn` takes besides the batch, as NumPy views of a cross-iteration
    layer's tensors (:func:`cross_iteration_views`)."""

    kernels: object  # the module, imported when first needed
    norm: tuple  # FusedCrossIterationNormFunction's: the kernels, gamma, beta, the window as pooled_forward reads it
    running: tuple  # running_mean, running_var
    entry: tuple  # commit's window arrays
    derivatives: tuple  # store_conv[_moments]'s and store_linear's: dmu, dnu and their products with W
    producer: tuple  # the producer's weight (C, F) and bias (zeros without one)
    geometry: tuple  # a conv producer's kernel size, stride, padding, dilation, as store_conv takes them


def cross_iteration_views(gamma, beta, running_mean, running_var, producer: torch.nn.Module, window: tuple,
                          compensate: bool) -> "CrossIterationViews | None":
    """NumPy views of a cross-iteration layer's tensors for the kernels, or None where they cannot
    take them (a tensor off the CPU, or not float32/64; a producer weight that is not contiguous,
    whose ``(C, F)`` reshape would be a copy, stale after the next optimizer step).

    ``gamma``/``beta`` the layer's affine parameters (None without), ``window`` its window buffers
    ``(mu, nu, bias, dmu, dnu, dmu_w, dnu_w, valid)`` (``(P, C)``, ``(P, C)``, ``(P, C)``,
    ``(P, G, F)``, ``(P, C, F)``, ``(P, C)``, ``(P, C)``, ``(P,)``; naive CBN's derivatives are
    ``(P, 0)``). The views share memory with the tensors: a tensor replaced (``.to()``,
    ``load_state_dict(assign=True)``) needs new views.
    """
    weight, bias = producer.weight, producer.bias
    tensors = (gamma, beta, running_mean, running_var, weight, bias)
    if not all(t is None or (t.is_cpu and t.dtype in FUSED_DTYPES) for t in tensors):
        return None
    if not all(t.is_cpu for t in window) or window[0].dtype not in FUSED_DTYPES or not weight.is_contiguous():
        return None
    from bnlab.kernels import cpu_cbn  # numba: imported by the first layer that trains on it

    c = running_mean.shape[0]
    gamma, beta, mean, var, weight, bias = (t.detach() if t is not None else None for t in tensors)
    if gamma is None:
        gamma, beta = torch.ones(c, dtype=mean.dtype), torch.zeros(c, dtype=mean.dtype)
    if bias is None:
        bias = torch.zeros(c, dtype=weight.dtype)
    window = list(window)
    if not compensate:  # (P, 0) placeholders, shaped as the kernels index them
        window[3], window[4] = (t.view(t.shape[0], 1, 0) for t in window[3:5])
    w_mu, w_nu, w_bias, w_dmu, w_dnu, w_dmu_w, w_dnu_w, valid = (t.detach().numpy() for t in window)
    weight, bias = weight.reshape(c, -1).numpy(), bias.numpy()  # (C, C_in/G, kh, kw) -> (C, F)
    _check_window_shapes(bias, (w_mu, w_nu, w_bias, w_dmu_w, w_dnu_w), valid, (w_dmu, w_dnu) if compensate else None,
                         weight.shape)
    return CrossIterationViews(
        kernels=cpu_cbn,
        norm=(cpu_cbn, gamma.numpy(), beta.numpy(),
              (weight, bias, w_mu, w_nu, w_bias, w_dmu, w_dnu, w_dmu_w, w_dnu_w, valid, compensate)),
        running=(mean.numpy(), var.numpy()),
        entry=(bias, w_mu, w_nu, w_bias, valid, compensate),
        derivatives=(w_dmu, w_dnu, w_dmu_w, w_dnu_w),
        producer=(weight, bias),
        geometry=(*producer.kernel_size, *producer.stride, *conv_padding(producer), *producer.dilation)
        if isinstance(producer, torch.nn.Conv2d) else (),
    )


def _check_window_shapes(bias, window_rows, valid, derivatives, weight_shape) -> None:
    """ValueError unless the arrays a cross-iteration layer hands the kernels fit each other: the
    kernels index them unchecked, and a buffer of another shape (replaced by hand) would have them
    read and write past its end. The producer's ``bias`` ``(C,)``; ``window_rows`` ``(P, C)``;
    ``valid`` ``(P,)``; ``derivatives`` (compensated) ``(P, G, F)`` and ``(P, C, F)``, G dividing C,
    for the producer's ``(C, F)`` weight. (The layer's own parameters and running statistics are
    checked at every forward: ``BatchNorm._check_state``.)"""
    c, f = weight_shape
    p = valid.shape[0]
    fits = bias.shape == (c,) and all(a.shape == (p, c) for a in window_rows) and valid.ndim == 1
    if derivatives is not None:
        dmu, dnu = derivatives
        fits = fits and dnu.shape == (p, c, f) and dmu.ndim == 3 and dmu.shape[0] == p and dmu.shape[2] == f
        fits = fits and dmu.shape[1] > 0 and c % dmu.shape[1] == 0
    if not fits:
        shapes = [tuple(a.shape) for a in (bias, *window_rows, valid, *(derivatives or ()))]
        raise ValueError(f"cross-iteration BN: its buffers' shapes do not fit each other or its producer's weight "
                         f"{tuple(weight_shape)} (the producer's bias, the window's rows, valid and derivatives: "
                         f"{shapes}); was a buffer replaced by hand?")


def cross_iteration_commit_(views: CrossIterationViews, stats, m: int, momentum: float, slot: int) -> bool:
    """Fold a batch into the running statistics (the update of :func:`update_running_stats_`) and
    into window entry ``slot``: its mean, its second moment nu = sigma2_B + mu^2 (float64) and,
    compensated, the producer's bias (:func:`cross_iteration_store_` writes the rest). ``stats`` is what
    :class:`bnlab.autograd.FusedCrossIterationNormFunction` filled (rows 0 and 1: the batch's mean
    and biased variance). A non-finite batch changes nothing and returns False."""
    return views.kernels.commit(stats, m, *views.running, momentum, slot, *views.entry)


def cross_iteration_store_(views: CrossIterationViews, slot: int, x: torch.Tensor, u: torch.Tensor,
                           producer: torch.nn.Module, gradient: "torch.Tensor | None", moments: bool) -> None:
    """The batch's d mu/dW (the mean input patch) and d nu/dW = 2/m sum_p x(p) patch(p) into window
    entry ``slot``, for ``x = producer(u)``: a Linear's row by row; a conv's from its patches'
    second moments (``moments``: :func:`moments_pay`), or from torch's weight-gradient reduction
    (``gradient``, when the producer's hook took it, else taken here) scaled by 2/m; then their
    products with the producer's weight, in float64 from the stored values."""
    kernels, m = views.kernels, values_per_channel(x)
    if isinstance(producer, torch.nn.Linear):
        kernels.store_linear(slot, x.detach().numpy(), u.contiguous().numpy(), views.producer[0], *views.derivatives)
    elif gradient is None and moments:
        kernels.store_conv_moments(slot, conv_input(u, producer).contiguous().numpy(), *views.geometry,
                                   *views.producer, *views.derivatives)
    else:
        dnu = gradient if gradient is not None else conv_weight_gradient(x, u, producer)
        kernels.store_conv(slot, conv_input(u, producer).contiguous().numpy(), *views.geometry,
                           dnu.reshape(x.shape[1], -1).contiguous().numpy(), 2.0 / m, views.producer[0],
                           *views.derivatives)  # (C, ...) -> (C, F)
