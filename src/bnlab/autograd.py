"""torch.autograd.Function classes with hand-written backward passes.

``BatchNormFunction`` is Ioffe & Szegedy 2015's Algorithm 1 forward with the paper's
backpropagation (compact form, :func:`bnlab.functional.batch_norm_backward`) as its backward,
rather than autograd through elementwise ops. Its backward is itself built from differentiable
torch ops, so double backward (gradgradcheck) works too.

The kernels' functions (numba on the CPU, Triton, cross-iteration BN's) run their own backward
when no graph of the gradient is wanted, and under ``backward(create_graph=True)`` (a gradient
penalty, MAML) or for a batched gradient (``is_grads_batched=True``, a vmapped vjp) autograd's
through the same forward in torch ops (:func:`gradient_graph`), so every layer is twice
differentiable (the synchronized one too: :mod:`bnlab.distributed`).
"""

from __future__ import annotations

import numpy as np
import torch

from bnlab import functional as F


def graph_backward(dy: torch.Tensor) -> bool:
    """Whether a kernel function's backward must be autograd's through torch ops
    (:func:`gradient_graph`) rather than its hand-written kernels: under
    ``backward(create_graph=True)`` (a gradient penalty, MAML), which wants a graph of the
    gradient, and where the gradient ``dy`` comes batched, which the kernels cannot take: under
    torch.func's transforms (:func:`bnlab.functional.transformed`: ``vmap`` of a ``vjp``,
    ``jacrev``, ``hessian``) or torch.autograd's own vmap (``autograd.grad(...,
    is_grads_batched=True)``, ``autograd.functional.jacobian(..., vectorize=True)``)."""
    return torch.is_grad_enabled() or F.transformed() or torch._C._functorch.is_legacy_batchedtensor(dy)


def gradient_graph(ctx, forward, inputs: tuple, dy: torch.Tensor) -> tuple:
    """The backward as autograd's (:func:`graph_backward`): the gradients of ``forward()``, the
    forward computed again from the saved ``inputs`` in differentiable torch ops. The hand-written
    kernels' backward has no graph; this one's is autograd's own. Returns one gradient per input
    (None where not needed)."""
    with torch.enable_grad():  # (under a batched backward, grad mode is off: the forward needs a graph)
        y = forward()
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and ctx.needs_input_grad[i]]
    grads = torch.autograd.grad(y, [inputs[i] for i in wanted], dy, create_graph=torch.is_grad_enabled(),
                                allow_unused=True)
    result = [None] * len(ctx.needs_input_grad)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


class BatchNormFunction(torch.autograd.Function):
    """y, mu_B, sigma2_B = Algorithm 1 (x, gamma, beta); gradients flow to x, gamma and beta only.

    The statistics are returned for the running-average update and are not differentiable.
    Low-precision inputs are normalized with float32 statistics; ``y`` keeps the input dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, var_biased = F.batch_stats(x)
        invstd = torch.rsqrt(var_biased + eps)
        y = F.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var_biased)
        return y, mean, var_biased

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # Double backward: the statistics are functions of x, so recompute them with
            # differentiable ops instead of using the constants saved by forward.
            mean, var_biased = F.batch_stats(x)
            invstd = torch.rsqrt(var_biased + ctx.eps)
        dx, dgamma, dbeta = F.batch_norm_backward(dy, x, mean, invstd, weight)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dgamma.to(weight.dtype) if need_w else None,
            dbeta.to(weight.dtype if weight is not None else dbeta.dtype) if need_b else None,
            None,
        )


def _layout(x: torch.Tensor):
    """How the fused CPU kernels see ``x``: (kernel view as a tensor, rows?, to restore the shape)."""
    c = x.shape[1]
    if not F.row_layout(x):
        return x.contiguous().view(x.shape[0], c, -1), False  # (N, C, *S) -> (N, C, prod(S))
    if F.flat_rows(x):
        return x.reshape(x.shape[0], c).contiguous(), True  # (N, C, 1, ...) is (N, C) rows
    return x.permute(0, 2, 3, 1).reshape(-1, c), True  # NHWC memory: (N*H*W, C) rows, no copy


def _restore(array, like: torch.Tensor, rows: bool) -> torch.Tensor:
    """The kernels' NumPy output as a tensor of ``like``'s shape and layout, shaped on the NumPy side:
    a tensor of its own, not a view of another. (A custom Function's output that is a view may not
    be changed in place, and BN followed by ``nn.ReLU(inplace=True)`` does that.)"""
    if rows and like.dim() == 4 and like[0, 0].numel() > 1:
        n, c, h, w = like.shape
        return torch.from_numpy(array.reshape(n, h, w, c).transpose(0, 3, 1, 2))  # a channels_last NCHW tensor
    return torch.from_numpy(array.reshape(like.shape))


def _bn_act(x, weight, bias, eps, act, slope):
    """act(BN(x)) with batch statistics, in differentiable torch ops: the kernels' forward as a graph."""
    mean, var_biased = F.batch_stats(x)
    return F.activation(F.normalize(x, mean, torch.rsqrt(var_biased + eps), weight, bias), act, slope)


class BatchNormActFunction(torch.autograd.Function):
    """y, mu_B, invstd = act(BN(x)) on the CPU in two passes forward and three backward (numba).

    See :mod:`bnlab.kernels.cpu_fused` for the math. float32 and float64; NCHW, channels_last and
    (N, C) layouts. The statistics come back in float64 for the running update.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope):
        from bnlab.kernels import cpu_fused

        w, b = F.affine_or_identity(weight, bias, x, x.dtype)
        xv, rows = _layout(x)
        y, mean, invstd = cpu_fused.forward(xv.numpy(), w.numpy(), b.numpy(), eps, act, slope, rows)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, invstd)
        ctx.config = (act, slope, rows)
        ctx.eps = eps
        mean_t, invstd_t = torch.from_numpy(mean), torch.from_numpy(invstd)
        ctx.mark_non_differentiable(mean_t, invstd_t)
        return _restore(y, x, rows), mean_t, invstd_t

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        from bnlab.kernels import cpu_fused

        x, weight, bias = ctx.saved_tensors
        act, slope, rows = ctx.config
        if graph_backward(dy):
            return gradient_graph(ctx, lambda: _bn_act(x, weight, bias, ctx.eps, act, slope), (x, weight, bias), dy)
        w, b = F.affine_or_identity(weight, bias, x, x.dtype)
        xv, _ = _layout(x)
        channels_last = rows and x.dim() == 4 and x[0, 0].numel() > 1
        dyv, _ = _layout(dy.to(memory_format=torch.channels_last) if channels_last else dy)
        dx, dw, db = cpu_fused.backward(dyv.numpy(), xv.numpy(), w.numpy(), b.numpy(), *ctx.stats, act, slope, rows)
        grad_w = torch.from_numpy(dw).to(x.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = torch.from_numpy(db).to(x.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return _restore(dx, x, rows), grad_w, grad_b, None, None, None


class TritonBatchNormActFunction(torch.autograd.Function):
    """act(BN(x)) with the Triton kernels of :mod:`bnlab.kernels.triton_bn` (CUDA tensors, or any
    tensor under ``TRITON_INTERPRET=1``); the running buffers given are updated inside the forward
    launch (:func:`bnlab.kernels.triton_bn.forward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, running_mean, running_var, momentum):
        from bnlab.kernels import triton_bn

        w, b = F.affine_or_identity(weight, bias, x, torch.float32)
        y, mean, invstd = triton_bn.forward(x, w, b, eps, act, slope, running_mean, running_var, momentum)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.config = (act, slope)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        from bnlab.kernels import triton_bn

        x, weight, bias, mean, invstd = ctx.saved_tensors
        act, slope = ctx.config
        if graph_backward(dy):
            return gradient_graph(ctx, lambda: _bn_act(x, weight, bias, ctx.eps, act, slope), (x, weight, bias), dy)
        w, b = F.affine_or_identity(weight, bias, x, torch.float32)
        dx, dw, db = triton_bn.backward(dy, x, w, b, mean, invstd, act, slope)
        grad_w = dw.to(w.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = db.to(b.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None, None, None


class CrossIterationNormFunction(torch.autograd.Function):
    """y = gamma * (x - mu_bar) / sqrt(sigma2_bar + eps) + beta with Yao et al. 2020's pooled statistics.

    mu_bar = (mu + past_mu) / k and nu_bar = (nu + past_nu) / k, where mu and nu are the batch's
    mean and second moment (functions of x; nu = sigma2_B + mu^2 from the two-pass variance, so
    nu >= mu^2) and ``past_mu``, ``past_nu`` the
    sums of the k - 1 compensated past entries, already clipped by max(nu, mu^2) (constants:
    gradients flow through the current iteration only); sigma2_bar = nu_bar - mu_bar^2. The
    pooling runs in the past sums' dtype (float64: the window's), as nu_bar and mu_bar^2 are of
    the size of mu^2 and their difference would cancel in float32.

    Backward by hand, per channel over m values, with x_hat = (x - mu_bar) invstd:
        dmu_bar = -invstd sum g - 2 mu_bar dsigma2,   dsigma2 = -1/2 invstd^3 sum g (x - mu_bar),
        dmu = dmu_bar / k,   dnu = dsigma2 / k,       dx = g invstd + dmu / m + 2 x dnu / m,
    with g = gamma dy; collected, dx = gamma invstd (dy - (mean(dy) + x_hat mean(dy x_hat)) / k),
    which is BN's backward when k = 1. Both passes run on torch's fused inference-mode kernels
    (normalize with (mu_bar, sigma2_bar); their backward gives gamma invstd dy, sum dy and
    sum dy x_hat) plus one per-channel affine correction of dx.

    Returns ``(y, mu, sigma2)``: the batch's mean and biased variance are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mu, past_nu, k, eps):
        mu, var, mu_bar, var_bar = F.cross_iteration_statistics(x, past_mu, past_nu, k)  # (two-pass: nu >= mu^2)
        y = torch.native_batch_norm(x, weight, bias, mu_bar, var_bar, False, 0.0, eps)[0]
        ctx.save_for_backward(x, weight, bias, mu_bar, var_bar)
        ctx.k, ctx.eps, ctx.past = k, eps, (past_mu, past_nu)
        ctx.mark_non_differentiable(mu, var)
        return y, mu, var

    @staticmethod
    def backward(ctx, dy, _dmu, _dvar):
        x, weight, bias, mu_bar, var_bar = ctx.saved_tensors
        if graph_backward(dy):
            past = (*ctx.past, ctx.k)
            return gradient_graph(ctx, lambda: F.cross_iteration_normalize(x, weight, bias, *past, ctx.eps)[0],
                                  (x, weight, bias), dy)
        dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mu_bar, var_bar, None, None, False, ctx.eps, [True, True, True])
        nd, km = x.dim(), ctx.k * F.values_per_channel(x)
        invstd = torch.rsqrt(var_bar + ctx.eps)
        scale = invstd if weight is None else invstd * weight  # gamma invstd
        # dx -= gamma invstd / (k m) * (sum dy + x_hat sum dy x_hat), as a * x + b per channel
        a = scale * invstd * sum_dy_xhat / -km
        b = scale * sum_dy / -km - a * mu_bar
        dx.addcmul_(x, F.per_channel(a.to(x.dtype), nd)).add_(F.per_channel(b.to(x.dtype), nd))
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if bias is not None and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None


class FusedCrossIterationNormFunction(torch.autograd.Function):
    """:class:`CrossIterationNormFunction` on the CPU in one numba call each way.

    Forward: :func:`bnlab.kernels.cpu_cbn.pooled_forward` computes the batch's moments, compensates
    and pools the window (when ``pool_past``; else this is BN) and normalizes, in one pass over x
    for the statistics and one for the output. ``arrays`` are what the kernels take besides x:
    ``(kernels, gamma, beta, window)``: the module :mod:`bnlab.kernels.cpu_cbn`, NumPy views of
    ``weight`` and ``bias`` (ones and zeros without them) and ``window``, the producer's weight
    and bias, the layer's window buffers and ``compensate``. Backward:
    :func:`bnlab.kernels.cpu_cbn.pooled_backward` (under ``create_graph=True``,
    :func:`gradient_graph` through :func:`bnlab.functional.cross_iteration_normalize`). Float32 and
    float64 channels-first CPU tensors.

    Returns y, and fills ``stats``, a NumPy ``(5, C)`` float64 array: the batch's mean and biased
    variance (what the running statistics and the window take), then the pooled mean and
    1/sqrt(sigma2 + eps), and k at ``stats[4, 0]``. (An array, not a second output: autograd's
    bookkeeping of an output costs more than the kernel on a small batch.)
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, pool_past, arrays, stats):
        kernels, gamma, beta, window = arrays
        n, c = x.shape[0], x.shape[1]
        xa = x.detach().numpy().reshape(n, c, -1)  # (N, C, *) -> (N, C, S)
        y = torch.empty_like(x)
        ctx.k = kernels.pooled_forward(xa, gamma, beta, eps, pool_past, *window, y.numpy().reshape(n, c, -1),
                                       stats[0], stats[1], stats[2], stats[3])
        stats[4, 0] = ctx.k
        ctx.save_for_backward(x, weight, bias)  # (x only there: activation checkpointing frees and recomputes it)
        ctx.arrays, ctx.eps = (kernels, gamma, stats), eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        kernels, gamma, stats = ctx.arrays
        if graph_backward(dy):
            past_mu, past_nu, k = F.pooled_past_sums(stats, ctx.eps)
            past = torch.from_numpy(past_mu), torch.from_numpy(past_nu), k
            return gradient_graph(ctx, lambda: F.cross_iteration_normalize(x, weight, bias, *past, ctx.eps)[0],
                                  (x, weight, bias), dy)
        xa = x.detach().numpy().reshape(x.shape[0], x.shape[1], -1)  # (N, C, *) -> (N, C, S)
        dx = torch.empty_like(x)
        dgamma, dbeta = np.empty(xa.shape[1], xa.dtype), np.empty(xa.shape[1], xa.dtype)
        kernels.pooled_backward(dy.detach().numpy().reshape(xa.shape), xa, gamma, stats[2], stats[3], ctx.k,
                                dx.numpy().reshape(xa.shape), dgamma, dbeta)
        if weight is None:
            return dx, None, None, None, None, None, None
        dgamma, dbeta = torch.from_numpy(dgamma), torch.from_numpy(dbeta)
        if weight.dtype != dgamma.dtype:
            dgamma, dbeta = dgamma.to(weight.dtype), dbeta.to(weight.dtype)
        return dx, dgamma, dbeta, None, None, None, None


class ReplayedCrossIterationNormFunction(FusedCrossIterationNormFunction):
    """:class:`FusedCrossIterationNormFunction` with the window's part of the pooled statistics
    given, ``past = (sum of compensated mu, sum of max(nu, mu^2), k)`` (float64 NumPy, what the
    forward being recomputed pooled): for activation checkpointing's recomputation in the backward,
    when the window has changed since. The batch's moments come from x as there (NumPy, float64
    sums), then mu_bar = (mu + past mu) / k, sigma2_bar = max((nu + past nu) / k - mu_bar^2, 0) and
    y = gamma (x - mu_bar) / sqrt(sigma2_bar + eps) + beta. It saves what that function saves,
    fills ``stats`` as it does, and shares its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, past, arrays, stats):
        kernels, gamma, beta, _ = arrays
        past_mu, past_nu, k = past
        n, c = x.shape[0], x.shape[1]
        xa = x.detach().numpy().reshape(n, c, -1)
        stats[0] = mean = xa.mean(axis=(0, 2), dtype=np.float64)
        stats[1] = var = xa.var(axis=(0, 2), dtype=np.float64)
        stats[2] = mu_bar = (mean + past_mu) / k
        stats[3] = invstd = 1.0 / np.sqrt(np.maximum((var + mean * mean + past_nu) / k - mu_bar * mu_bar, 0.0) + eps)
        stats[4, 0] = ctx.k = k
        scale = torch.from_numpy(gamma * invstd).to(x.dtype)  # (as the kernel rounds them)
        offset = torch.from_numpy(beta - mu_bar * gamma * invstd).to(x.dtype)
        y = x.detach() * F.per_channel(scale, x.dim()) + F.per_channel(offset, x.dim())
        ctx.save_for_backward(x, weight, bias)
        ctx.arrays, ctx.eps = (kernels, gamma, stats), eps
        return y
