"""Batch Normalization fused with its activation on the CPU, as loops compiled by numba.

BN is memory-bound: its cost is the passes it makes over the tensor. Done as torch's BN followed by
an activation, training makes 5 passes forward (BN: statistics, normalize; activation: read, write)
and 8 backward. Fused here: forward reads x twice and writes y once (statistics, then normalize and
activate); backward reads x and dy twice and writes dx once, recomputing the activation's input
from x instead of saving it. Threads split the channels.

Math (Ioffe & Szegedy 2015, Algorithm 1 and section 3), per channel over its m values:
    mu = mean(x), sigma2 = mean((x - mu)^2), x_hat = (x - mu) / sqrt(sigma2 + eps)
    u = gamma * x_hat + beta,  y = act(u)
    g = dy * act'(u),  dbeta = sum g,  dgamma = sum g * x_hat
    dx = gamma / sqrt(sigma2 + eps) / m * (m * g - dbeta - x_hat * dgamma)
The statistics accumulate in float64 around a shift (the channel's first value), so a large
common offset does not cancel catastrophically.

Two layouts: channels-first ``(N, C, S)`` (NCHW with S = H*W) and rows ``(M, C)`` (``(N, C)``
inputs and channels_last NHWC, with M = N*H*W).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "sigmoid": 4}
# Reassociation lets the reductions vectorize; no 'nnan'/'ninf': NaN and inf must propagate.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(inline="always")
def _act(u, act, slope):
    if act == 1:
        return u if u > 0 else u * 0
    if act == 2:
        return u if u > 0 else slope * u
    if act == 3:
        return u / (u - u + 1 + math.exp(-u))
    if act == 4:
        return (u - u + 1) / (u - u + 1 + math.exp(-u))
    return u


@numba.njit(inline="always")
def _act_grad(u, act, slope):
    one = u - u + 1  # 1 in u's dtype (mixing in float64 literals stops the loops vectorizing); NaN stays NaN
    if act == 1:
        return one if u > 0 else one - one
    if act == 2:
        return one if u > 0 else one * slope
    if act == 3:
        s = one / (one + math.exp(-u))
        return s * (one + u * (one - s))
    if act == 4:
        s = one / (one + math.exp(-u))
        return s * (one - s)
    return one


@numba.njit(inline="always", fastmath=FASTMATH)
def channel_moments(x, c):
    """The mean and biased variance of channel ``c`` of a channels-first ``x (N, C, S)``, summed
    in float64 around a shift (the channel's first value)."""
    n_, _, s_ = x.shape
    m = n_ * s_
    shift = x[0, c, 0]
    s1 = 0.0
    s2 = 0.0
    for n in range(n_):
        for s in range(s_):
            d = np.float64(x[n, c, s]) - shift
            s1 += d
            s2 += d * d
    mu_d = s1 / m
    return shift + mu_d, max(s2 / m - mu_d * mu_d, 0.0)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward_cfirst(x, weight, bias, eps, act, slope, y, mean, invstd):
    """Channels-first ``x (N, C, S)``: writes ``y``, the batch ``mean`` and ``invstd`` per channel."""
    n_, c_, s_ = x.shape
    for c in prange(c_):
        mu, var = channel_moments(x, c)
        inv = 1.0 / math.sqrt(var + eps)
        mean[c] = mu
        invstd[c] = inv
        scale = weight[c] * inv
        for n in range(n_):
            for s in range(s_):
                y[n, c, s] = _act((x[n, c, s] - mu) * scale + bias[c], act, slope)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def backward_cfirst(dy, x, weight, bias, mean, invstd, act, slope, dx, dweight, dbias):
    """Channels-first backward: writes ``dx``, ``dweight`` (dgamma) and ``dbias`` (dbeta).

    Each contiguous run of S values is summed in the input's dtype, the runs in float64.
    """
    n_, c_, s_ = x.shape
    m = n_ * s_
    for c in prange(c_):
        mu, inv = x.dtype.type(mean[c]), x.dtype.type(invstd[c])
        w, b = weight[c], bias[c]
        sum_g = 0.0
        sum_gx = 0.0
        for n in range(n_):
            xr, dr = x[n, c], dy[n, c]
            part_g = xr[0] * 0
            part_gx = xr[0] * 0
            for s in range(s_):
                x_hat = (xr[s] - mu) * inv
                g = dr[s] * _act_grad(w * x_hat + b, act, slope)
                part_g += g
                part_gx += g * x_hat
            sum_g += part_g
            sum_gx += part_gx
        dweight[c] = sum_gx
        dbias[c] = sum_g
        k = w * inv / m
        sg, sgx, mm = x.dtype.type(sum_g), x.dtype.type(sum_gx), x.dtype.type(m)
        for n in range(n_):
            xr, dr, out = x[n, c], dy[n, c], dx[n, c]
            for s in range(s_):
                x_hat = (xr[s] - mu) * inv
                g = dr[s] * _act_grad(w * x_hat + b, act, slope)
                out[s] = k * (mm * g - sg - x_hat * sgx)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def pooled_backward(dy, x, gamma, mu_bar, invstd, k, dx, dgamma, dbeta):
    """Channels-first BN backward without an activation, the statistics' share 1/k: k = 1 for BN,
    the iterations pooled for Cross-Iteration BN (:func:`bnlab.kernels.cpu_cbn.pooled_forward`).

        x_hat = (x - mu_bar) invstd,  dbeta = sum dy,  dgamma = sum dy x_hat,
        dx = gamma invstd (dy - (dbeta + x_hat dgamma) / (k m))

    (:class:`bnlab.autograd.CrossIterationNormFunction` derives it): Cross-Iteration BN's
    backward, whose statistics pool k iterations, and BN's with k = 1. Each contiguous run of S
    values is summed in the input's dtype, the runs in float64.
    """
    n_, c_, s_ = x.shape
    km = k * n_ * s_
    for c in prange(c_):
        mu, inv = x.dtype.type(mu_bar[c]), x.dtype.type(invstd[c])
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for n in range(n_):
            xr, dr = x[n, c], dy[n, c]
            part = xr[0] * 0
            part_xhat = xr[0] * 0
            for s in range(s_):
                part += dr[s]
                part_xhat += dr[s] * (xr[s] - mu)
            sum_dy += part
            sum_dy_xhat += part_xhat * inv
        dgamma[c] = sum_dy_xhat
        dbeta[c] = sum_dy
        scale = x.dtype.type(gamma[c] * invstd[c])
        a = x.dtype.type(sum_dy_xhat * invstd[c] / km)  # dx = scale * (dy - a (x - mu_bar) - b)
        b = x.dtype.type(sum_dy / km)
        for n in range(n_):
            xr, dr, out = x[n, c], dy[n, c], dx[n, c]
            for s in range(s_):
                out[s] = scale * (dr[s] - a * (xr[s] - mu) - b)


def _blocks(c_: int) -> int:
    return max(1, min(numba.get_num_threads() * 4, c_ // 16))


@numba.njit(inline="always")
def _channel_block(blk, blocks, c_):
    """Channels [c0, c1) of block ``blk`` when ``blocks`` threads split C channels (empty past the end)."""
    step = (c_ + blocks - 1) // blocks
    c0 = blk * step
    return c0, min(c_, c0 + step)


@numba.njit(cache=True)
def fold_running(mean, var, m, running_mean, running_var, momentum):
    """Fold one batch into the running statistics, in place (the update of
    :func:`bnlab.functional.update_running_stats_`, in one call instead of a dozen small torch ops):

        running_mean <- (1 - momentum) running_mean + momentum mu_B
        running_var  <- (1 - momentum) running_var  + momentum m / (m - 1) sigma2_B

    ``mean`` and ``var`` (biased) per channel. Returns False, changing nothing, when a channel's
    mean or unbiased variance is not finite in the buffers' dtype.
    """
    c_ = mean.shape[0]
    correction = m / (m - 1.0)
    for c in range(c_):
        unbiased = var[c] * correction
        if not (np.isfinite(running_mean.dtype.type(mean[c])) and np.isfinite(running_var.dtype.type(unbiased))):
            return False
    for c in range(c_):
        running_mean[c] += momentum * (mean[c] - running_mean[c])
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * correction * var[c]
    return True


PARTIAL_ROWS = 64  # rows summed in the input's dtype before joining the float64 totals


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def forward_rows(x, weight, bias, eps, act, slope, y, mean, invstd, blocks):
    """Rows ``x (M, C)`` (channels-last): the same as :func:`forward_cfirst`.

    Threads take blocks of channels; each sweeps the rows with its block's values contiguous.
    Sums run in the input's dtype over ``PARTIAL_ROWS`` rows at a time, then join float64 totals.
    The loops are compiled once per activation (``act`` a constant in each copy): with ``act``
    read at run time in the inner loop, identity and leaky ReLU ran 6-9x slower than ReLU.
    """
    if act == 0:
        _forward_rows(x, weight, bias, eps, 0, slope, y, mean, invstd, blocks)
    elif act == 1:
        _forward_rows(x, weight, bias, eps, 1, slope, y, mean, invstd, blocks)
    elif act == 2:
        _forward_rows(x, weight, bias, eps, 2, slope, y, mean, invstd, blocks)
    else:  # (SiLU, sigmoid: exp one value at a time dominates either way)
        _forward_rows(x, weight, bias, eps, act, slope, y, mean, invstd, blocks)


@numba.njit(inline="always")
def _forward_rows(x, weight, bias, eps, act, slope, y, mean, invstd, blocks):
    m, c_ = x.shape
    for blk in prange(blocks):
        c0, c1 = _channel_block(blk, blocks, c_)
        cb = c1 - c0
        if cb <= 0:
            continue
        shift = x[0, c0:c1].copy()
        total1 = np.zeros(cb)
        total2 = np.zeros(cb)
        part1 = np.zeros(cb, x.dtype)
        part2 = np.zeros(cb, x.dtype)
        for r0 in range(0, m, PARTIAL_ROWS):
            part1[:] = 0
            part2[:] = 0
            for r in range(r0, min(m, r0 + PARTIAL_ROWS)):
                row = x[r, c0:c1]
                for j in range(cb):
                    d = row[j] - shift[j]
                    part1[j] += d
                    part2[j] += d * d
            for j in range(cb):
                total1[j] += part1[j]
                total2[j] += part2[j]
        mu = np.empty(cb, x.dtype)
        scale = np.empty(cb, x.dtype)
        beta = np.empty(cb, x.dtype)
        for j in range(cb):
            mu_d = total1[j] / m
            var = max(total2[j] / m - mu_d * mu_d, 0.0)
            inv = 1.0 / math.sqrt(var + eps)
            mean[c0 + j] = shift[j] + mu_d
            invstd[c0 + j] = inv
            mu[j] = shift[j] + mu_d
            scale[j] = weight[c0 + j] * inv
            beta[j] = bias[c0 + j]
        for r in range(m):
            row = x[r, c0:c1]
            out = y[r, c0:c1]
            for j in range(cb):
                out[j] = _act((row[j] - mu[j]) * scale[j] + beta[j], act, slope)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def backward_rows(dy, x, weight, bias, mean, invstd, act, slope, dx, dweight, dbias, blocks):
    """Rows backward: the same as :func:`backward_cfirst`, organized (and compiled per
    activation) as :func:`forward_rows`."""
    if act == 0:
        _backward_rows(dy, x, weight, bias, mean, invstd, 0, slope, dx, dweight, dbias, blocks)
    elif act == 1:
        _backward_rows(dy, x, weight, bias, mean, invstd, 1, slope, dx, dweight, dbias, blocks)
    elif act == 2:
        _backward_rows(dy, x, weight, bias, mean, invstd, 2, slope, dx, dweight, dbias, blocks)
    else:
        _backward_rows(dy, x, weight, bias, mean, invstd, act, slope, dx, dweight, dbias, blocks)


@numba.njit(inline="always")
def _backward_rows(dy, x, weight, bias, mean, invstd, act, slope, dx, dweight, dbias, blocks):
    m, c_ = x.shape
    for blk in prange(blocks):
        c0, c1 = _channel_block(blk, blocks, c_)
        cb = c1 - c0
        if cb <= 0:
            continue
        mu = np.empty(cb, x.dtype)
        inv = np.empty(cb, x.dtype)
        w = np.empty(cb, x.dtype)
        b = np.empty(cb, x.dtype)
        for j in range(cb):
            mu[j], inv[j], w[j], b[j] = mean[c0 + j], invstd[c0 + j], weight[c0 + j], bias[c0 + j]
        total_g = np.zeros(cb)
        total_gx = np.zeros(cb)
        part_g = np.zeros(cb, x.dtype)
        part_gx = np.zeros(cb, x.dtype)
        for r0 in range(0, m, PARTIAL_ROWS):
            part_g[:] = 0
            part_gx[:] = 0
            for r in range(r0, min(m, r0 + PARTIAL_ROWS)):
                row, grad = x[r, c0:c1], dy[r, c0:c1]
                for j in range(cb):
                    x_hat = (row[j] - mu[j]) * inv[j]
                    g = grad[j] * _act_grad(w[j] * x_hat + b[j], act, slope)
                    part_g[j] += g
                    part_gx[j] += g * x_hat
            for j in range(cb):
                total_g[j] += part_g[j]
                total_gx[j] += part_gx[j]
        k = np.empty(cb, x.dtype)
        sg = np.empty(cb, x.dtype)
        sgx = np.empty(cb, x.dtype)
        for j in range(cb):
            dweight[c0 + j] = total_gx[j]
            dbias[c0 + j] = total_g[j]
            k[j] = w[j] * inv[j] / m
            sg[j] = total_g[j]
            sgx[j] = total_gx[j]
        for r in range(m):
            row, grad, out = x[r, c0:c1], dy[r, c0:c1], dx[r, c0:c1]
            for j in range(cb):
                x_hat = (row[j] - mu[j]) * inv[j]
                g = grad[j] * _act_grad(w[j] * x_hat + b[j], act, slope)
                out[j] = k[j] * (m * g - sg[j] - x_hat * sgx[j])


def forward(x: np.ndarray, weight, bias, eps: float, act: str, slope: float, channels_last: bool):
    """Fused training forward on a NumPy view; returns ``(y, mean, invstd)`` (statistics float64)."""
    c_ = x.shape[-1] if channels_last else x.shape[1]
    y = np.empty_like(x)
    mean, invstd = np.empty(c_), np.empty(c_)
    if channels_last:
        forward_rows(x, weight, bias, eps, ACTIVATIONS[act], x.dtype.type(slope), y, mean, invstd, _blocks(c_))
    else:
        forward_cfirst(x, weight, bias, eps, ACTIVATIONS[act], x.dtype.type(slope), y, mean, invstd)
    return y, mean, invstd


def backward(dy, x, weight, bias, mean, invstd, act: str, slope: float, channels_last: bool):
    """Fused backward on NumPy views; returns ``(dx, dweight, dbias)`` (the last two float64)."""
    c_ = x.shape[-1] if channels_last else x.shape[1]
    dx = np.empty_like(x)
    dweight, dbias = np.empty(c_), np.empty(c_)
    if channels_last:
        backward_rows(dy, x, weight, bias, mean, invstd, ACTIVATIONS[act], x.dtype.type(slope), dx, dweight, dbias,
                      _blocks(c_))
    elif act == "identity":  # (the activation's dispatch compiles poorly for identity: 5-9x slower)
        pooled_backward(dy, x, weight, mean, invstd, 1, dx, dweight, dbias)
    else:
        backward_cfirst(dy, x, weight, bias, mean, invstd, ACTIVATIONS[act], x.dtype.type(slope), dx, dweight, dbias)
    return dx, dweight, dbias
