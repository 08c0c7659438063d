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
