"""torch.autograd.Function classes with hand-written backward passes.

``BatchNormFunction`` is Ioffe & Szegedy 2015's Algorithm 1 forward with the paper's
backpropagation (compact form, :func:`bnlab.functional.batch_norm_backward`) as its backward,
rather than autograd through elementwise ops. Its backward is itself built from differentiable
torch ops, so double backward (gradgradcheck) works too.
"""

from __future__ import annotations

import torch

from bnlab import functional as F


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
    if x.dim() == 2 or x[0, 0].numel() == 1:
        return x.reshape(x.shape[0], c).contiguous(), True  # (N, C, 1, ...) is (N, C) rows
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x.permute(0, 2, 3, 1).reshape(-1, c), True  # NHWC memory: (N*H*W, C) rows, no copy
    return x.contiguous().view(x.shape[0], c, -1), False  # (N, C, *S) -> (N, C, prod(S))


def _restore(view: torch.Tensor, like: torch.Tensor, rows: bool) -> torch.Tensor:
    if rows and like.dim() == 4 and like[0, 0].numel() > 1:
        n, c, h, w = like.shape
        return view.view(n, h, w, c).permute(0, 3, 1, 2)  # a channels_last NCHW tensor
    return view.view(like.shape)


class BatchNormActFunction(torch.autograd.Function):
    """y, mu_B, invstd = act(BN(x)) on the CPU in two passes forward and three backward (numba).

    See :mod:`bnlab.kernels.cpu_fused` for the math. float32 and float64; NCHW, channels_last and
    (N, C) layouts. The statistics come back in float64 for the running update.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope):
        from bnlab.kernels import cpu_fused

        c = x.shape[1]
        w = (weight if weight is not None else torch.ones(c, dtype=x.dtype)).detach()
        b = (bias if bias is not None else torch.zeros(c, dtype=x.dtype)).detach()
        xv, rows = _layout(x)
        y, mean, invstd = cpu_fused.forward(xv.numpy(), w.numpy(), b.numpy(), eps, act, slope, rows)
        ctx.save_for_backward(x, w, b)
        ctx.stats = (mean, invstd)
        ctx.config = (act, slope, rows, weight is not None)
        mean_t, invstd_t = torch.from_numpy(mean), torch.from_numpy(invstd)
        ctx.mark_non_differentiable(mean_t, invstd_t)
        return _restore(torch.from_numpy(y), x, rows), mean_t, invstd_t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd):
        from bnlab.kernels import cpu_fused

        x, w, b = ctx.saved_tensors
        act, slope, rows, affine = ctx.config
        xv, _ = _layout(x)
        channels_last = rows and x.dim() == 4 and x[0, 0].numel() > 1
        dyv, _ = _layout(dy.to(memory_format=torch.channels_last) if channels_last else dy)
        dx, dw, db = cpu_fused.backward(dyv.numpy(), xv.numpy(), w.numpy(), b.numpy(), *ctx.stats, act, slope, rows)
        grad_w = torch.from_numpy(dw).to(x.dtype) if affine and ctx.needs_input_grad[1] else None
        grad_b = torch.from_numpy(db).to(x.dtype) if affine and ctx.needs_input_grad[2] else None
        return _restore(torch.from_numpy(dx), x, rows), grad_w, grad_b, None, None, None


class TritonBatchNormActFunction(torch.autograd.Function):
    """act(BN(x)) with the Triton kernels of :mod:`bnlab.kernels.triton_bn` (CUDA tensors, or any
    tensor under ``TRITON_INTERPRET=1``); the running buffers are updated inside the forward launch."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, running_mean, running_var, momentum):
        from bnlab.kernels import triton_bn

        c = x.shape[1]
        w = (weight if weight is not None else torch.ones(c, device=x.device)).detach()
        b = (bias if bias is not None else torch.zeros(c, device=x.device)).detach()
        y, mean, invstd = triton_bn.forward(x, w, b, eps, act, slope, running_mean, running_var, momentum)
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.config = (act, slope, weight is not None)
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _dinvstd):
        from bnlab.kernels import triton_bn

        x, w, b, mean, invstd = ctx.saved_tensors
        act, slope, affine = ctx.config
        dx, dw, db = triton_bn.backward(dy, x, w, b, mean, invstd, act, slope)
        grad_w = dw.to(w.dtype) if affine and ctx.needs_input_grad[1] else None
        grad_b = db.to(b.dtype) if affine and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None, None, None


class CrossIterationNormFunction(torch.autograd.Function):
    """y = gamma * (x - mu_bar) / sqrt(sigma2_bar + eps) + beta with Yao et al. 2020's pooled statistics.

    mu_bar = (mu + past_mu) / k and nu_bar = (max(nu, mu^2) + past_nu) / k, where mu, nu are the
    batch's mean and second moment (functions of x) and ``past_mu``, ``past_nu`` the sums of the
    k - 1 compensated past entries (constants: gradients flow through the current iteration only);
    sigma2_bar = nu_bar - mu_bar^2. Backward by hand, per channel over m values:
        g = dy * gamma,  dsigma2 = -1/2 invstd^3 sum g (x - mu_bar)
        dmu_bar = -invstd sum g - 2 mu_bar dsigma2,  dnu_bar = dsigma2
        dmu = dmu_bar / k + [nu < mu^2] 2 mu dnu_bar / k,  dnu = [nu >= mu^2] dnu_bar / k
        dx = g invstd + dmu / m + 2 x dnu / m
    Returns ``(y, mu, nu)``; the last two are the batch's moments, not differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, past_mu, past_nu, k, eps):
        nd, dims = x.dim(), F.reduce_dims(x)
        mu, nu = x.mean(dims), x.square().mean(dims)
        mu_sq = mu * mu
        use_nu = nu >= mu_sq
        mu_bar = (mu + past_mu) / k
        var_bar = ((torch.where(use_nu, nu, mu_sq) + past_nu) / k - mu_bar * mu_bar).clamp_min(0)
        invstd = torch.rsqrt(var_bar + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mu_bar * scale if bias is None else bias - mu_bar * scale
        y = torch.addcmul(F.per_channel(shift, nd), x, F.per_channel(scale, nd))
        ctx.save_for_backward(x, weight, mu, mu_bar, invstd, use_nu)
        ctx.k, ctx.has_bias = k, bias is not None
        ctx.mark_non_differentiable(mu, nu)
        return y, mu, nu

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmu, _dnu):
        x, weight, mu, mu_bar, invstd, use_nu = ctx.saved_tensors
        nd, dims, k = x.dim(), F.reduce_dims(x), ctx.k
        m = F.values_per_channel(x)
        sum_dy = dy.sum(dims)
        sum_dy_x = (dy * x).sum(dims)
        gamma = weight if weight is not None else torch.ones_like(mu)
        sum_g, sum_gx = gamma * sum_dy, gamma * sum_dy_x
        dvar = -0.5 * invstd**3 * (sum_gx - mu_bar * sum_g)
        dmu_bar = -invstd * sum_g - 2 * mu_bar * dvar
        dmu = dmu_bar / k + torch.where(use_nu, 0.0, 2 * mu * dvar / k)
        dnu = torch.where(use_nu, dvar / k, 0.0)
        # dx = (gamma invstd) dy + (2 dnu / m) x + dmu / m, one pass over the tensor
        dx = torch.addcmul(F.per_channel(dmu / m, nd), x, F.per_channel(2 * dnu / m, nd))
        dx.addcmul_(dy, F.per_channel(gamma * invstd, nd))
        x_hat_sum = invstd * (sum_dy_x - mu_bar * sum_dy)  # sum dy * x_hat
        grad_w = x_hat_sum if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None, None, None, None
