"""Batch Normalization fused with its activation as Triton kernels (GPUs; the CPU under
``TRITON_INTERPRET=1`` for tests).

Math: Ioffe & Szegedy 2015, Algorithm 1 and section 3, as in :mod:`bnlab.kernels.cpu_fused`.
One program per channel. The input is addressed as (N, C, S) through one stride each, so
contiguous NCHW (strides C*S, S, 1), channels_last NHWC (S*C, 1, C) and (N, C) in either order run
without a copy, and the output gets the input's layout; other layouts (strided or channel slices,
transposed H and W) are copied to contiguous first. Statistics accumulate in float32 whatever
the input dtype (float32, float16, bfloat16; float64 too, where asked for by name): a first pass
takes the mean, a second the variance around it (no E[x^2] - E[x]^2 cancellation), a third writes
act(gamma * x_hat + beta) and folds the batch into the running statistics in the same launch.
Backward: one pass for dbeta = sum g and dgamma = sum g * x_hat (g = dy * act'(u), u recomputed
from x), one for dx. Inference: one elementwise pass with the folded scale and shift.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "sigmoid": 4}


@triton.jit
def _act(u, ACT: tl.constexpr, slope):
    if ACT == 1:
        u = tl.where(u > 0, u, 0.0)
    elif ACT == 2:
        u = tl.where(u > 0, u, u * slope)
    elif ACT == 3:
        u = u / (1.0 + tl.exp(-u))
    elif ACT == 4:
        u = 1.0 / (1.0 + tl.exp(-u))
    return u


@triton.jit
def _act_grad(u, ACT: tl.constexpr, slope):
    if ACT == 1:
        g = tl.where(u > 0, 1.0, 0.0)
    elif ACT == 2:
        g = tl.where(u > 0, 1.0, slope)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = s * (1.0 + u * (1.0 - s))
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-u))
        g = s * (1.0 - s)
    else:
        g = u * 0.0 + 1.0
    return g


@triton.jit
def _forward_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, rm_ptr, rv_ptr,
                    N, S, sn, sc, ss, eps, momentum, slope,
                    ACT: tl.constexpr, TRACK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    m = N * S
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < m
        offs = (i // S) * sn + c * sc + (i % S) * ss
        acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / m
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < m
        offs = (i // S) * sn + c * sc + (i % S) * ss
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
        acc += tl.where(mask, d * d, 0.0)
    var = tl.sum(acc, axis=0) / m
    invstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c).to(tl.float32)
    b = tl.load(b_ptr + c).to(tl.float32)
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < m
        offs = (i // S) * sn + c * sc + (i % S) * ss
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _act((x - mean) * invstd * w + b, ACT, slope)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + c, mean)
    tl.store(invstd_ptr + c, invstd)
    if TRACK:
        rm = tl.load(rm_ptr + c).to(tl.float32)
        rv = tl.load(rv_ptr + c).to(tl.float32)
        new_rm = (1.0 - momentum) * rm + momentum * mean
        new_rv = (1.0 - momentum) * rv + momentum * var * m / (m - 1)
        tl.store(rm_ptr + c, new_rm.to(rm_ptr.dtype.element_ty))
        tl.store(rv_ptr + c, new_rv.to(rv_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, invstd_ptr, dw_ptr, db_ptr,
                     N, S, sn, sc, ss, dsn, dsc, dss, slope,
                     ACT: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    m = N * S
    mean = tl.load(mean_ptr + c)
    invstd = tl.load(invstd_ptr + c)
    w = tl.load(w_ptr + c).to(tl.float32)
    b = tl.load(b_ptr + c).to(tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < m
        offs = (i // S) * sn + c * sc + (i % S) * ss
        doffs = (i // S) * dsn + c * dsc + (i % S) * dss
        x_hat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * invstd
        g = tl.load(dy_ptr + doffs, mask=mask, other=0.0).to(tl.float32) * _act_grad(w * x_hat + b, ACT, slope)
        g = tl.where(mask, g, 0.0)
        acc_g += g
        acc_gx += g * x_hat
    sum_g = tl.sum(acc_g, axis=0)
    sum_gx = tl.sum(acc_gx, axis=0)
    tl.store(dw_ptr + c, sum_gx)
    tl.store(db_ptr + c, sum_g)
    k = w * invstd / m
    for start in range(0, m, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < m
        offs = (i // S) * sn + c * sc + (i % S) * ss
        doffs = (i // S) * dsn + c * dsc + (i % S) * dss
        x_hat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean) * invstd
        g = tl.load(dy_ptr + doffs, mask=mask, other=0.0).to(tl.float32) * _act_grad(w * x_hat + b, ACT, slope)
        dx = k * (m * g - sum_g - x_hat * sum_gx)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inference_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, total, C, S, sn, sc, ss, slope,
                      ACT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    # logical (n, c, s) of the i-th element in NCS order, then its address in memory
    n = i // (C * S)
    c = (i // S) % C
    s = i % S
    offs = n * sn + c * sc + s * ss
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = x * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    tl.store(y_ptr + offs, _act(u, ACT, slope).to(y_ptr.dtype.element_ty), mask=mask)


def _spatial(t: torch.Tensor) -> tuple[list[int], list[int]]:
    """The sizes and strides of ``t``'s spatial dims (2 on) that are longer than 1 (a dim of size
    1 may have any stride: torch calls such a tensor contiguous whatever it is)."""
    dims = [k for k in range(2, t.dim()) if t.shape[k] > 1]
    return [t.shape[k] for k in dims], [t.stride(k) for k in dims]


def _ncs(t: torch.Tensor):
    """(N, S, strides n, c, s) of ``t`` viewed as (N, C, S); S flattens the spatial dims, which
    :func:`_addressable` has checked lie one stride apart."""
    sizes, strides = _spatial(t)
    return t.shape[0], math.prod(sizes), t.stride(0), t.stride(1), strides[-1] if strides else 1


def _flat_spatial(t: torch.Tensor) -> bool:
    """Whether ``t``'s spatial dims flatten to one stride, as in NCHW and channels_last."""
    sizes, strides = _spatial(t)
    return all(strides[k] == strides[k + 1] * sizes[k + 1] for k in range(len(sizes) - 1))


def _addressable(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` as the kernels address it, as (N, C, S) through one stride each, and an empty tensor
    of its shape, dtype and strides for the kernel to write (y, dx) at the same offsets.

    ``t`` itself where it can be (contiguous, channels_last, a transposed (N, C) or (N, C, L)):
    its spatial dims flatten to one stride and it is dense without overlap, so ``empty_like``
    keeps its strides. Otherwise (a strided slice, a channel slice, an expanded tensor, transposed
    H and W) a contiguous copy: written at the input's offsets, an output with strides of its own
    would be written out of its bounds, or in part.
    """
    out = torch.empty_like(t)
    if out.stride() != t.stride() or not _flat_spatial(t):
        t = t.contiguous()
        out = torch.empty_like(t)
    return t, out


def _block(m: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(m)))


def forward(x, weight, bias, eps, act, slope, running_mean=None, running_var=None, momentum=0.1):
    """Returns ``(y, mean, invstd)``; y has x's dtype, and its layout where the kernels address it
    (:func:`_addressable`); folds the batch into the running buffers it is given, whatever its
    statistics (one program per channel cannot know whether another's are finite: the caller
    passes copies and keeps them only for a finite batch, :func:`bnlab.functional.fold_if_finite_`)."""
    c = x.shape[1]
    x, y = _addressable(x)
    mean = torch.empty(c, dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    n, s, sn, sc, ss = _ncs(x)
    track = running_mean is not None
    dummy = mean
    _forward_kernel[(c,)](x, y, weight, bias, mean, invstd,
                          running_mean if track else dummy, running_var if track else dummy,
                          n, s, sn, sc, ss, eps, momentum, slope,
                          ACT=ACT_CODES[act], TRACK=track, BLOCK=_block(n * s))
    return y, mean, invstd


def backward(dy, x, weight, bias, mean, invstd, act, slope):
    """Returns ``(dx, dgamma, dbeta)``; dx has x's dtype, and its layout where the kernels address it."""
    c = x.shape[1]
    x, dx = _addressable(x)
    if not _flat_spatial(dy):  # (read only: any dense or strided layout whose spatial dims flatten)
        dy = dy.contiguous()
    dw = torch.empty(c, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw)
    n, s, sn, sc, ss = _ncs(x)
    _, _, dsn, dsc, dss = _ncs(dy)
    _backward_kernel[(c,)](dy, x, dx, weight, bias, mean, invstd, dw, db,
                           n, s, sn, sc, ss, dsn, dsc, dss, slope,
                           ACT=ACT_CODES[act], BLOCK=_block(n * s))
    return dx, dw, db


def inference(x, weight, bias, running_mean, running_var, eps, act, slope):
    """y = act(x * scale + shift) with scale = gamma / sqrt(Var + eps), shift = beta - E[x] * scale."""
    scale = (weight.float() * torch.rsqrt(running_var.float() + eps)).contiguous()
    shift = (bias.float() - running_mean.float() * scale).contiguous()
    x, y = _addressable(x)
    n, s, sn, sc, ss = _ncs(x)
    total = x.numel()
    block = 1024
    _inference_kernel[(triton.cdiv(total, block),)](x, y, scale, shift, total, x.shape[1], s, sn, sc, ss, slope,
                                                    ACT=ACT_CODES[act], BLOCK=block)
    return y
