"""Cross-Iteration BN's training step on the CPU, as loops compiled by numba.

Yao et al. 2020's layer does little arithmetic per iteration beyond BN's: its cost on a small
batch is the number of operations, each a few microseconds of dispatch when written as torch ops
(about 60 per layer). Here the whole per-channel part is one call:

:func:`pooled_forward`, per channel c over its m values (threads split the channels):
    mu, sigma2 = the batch's moments (float64 sums around a shift, as :mod:`cpu_fused`), nu = sigma2 + mu^2
    each valid past entry p, compensated to the producer's current weights W_t (eq. 7-8):
        mu_p' = mu_p + <d mu_p/dW, W_t> - <d mu_p/dW, W_p> + (b_t - b_p)
        nu_p' = nu_p + <d nu_p/dW, W_t> - <d nu_p/dW, W_p> + 2 mu_p (b_t - b_p)
    mu_bar = mean of mu and the mu_p'; nu_bar = mean of max(nu, mu^2) and max(nu_p', mu_p'^2) (eq. 9)
    y = gamma (x - mu_bar) / sqrt(nu_bar - mu_bar^2 + eps) + beta
Then :func:`commit` folds the batch into the running statistics and makes it the window's entry
``slot`` when its statistics are finite, and :func:`store_conv` or :func:`store_linear` write the
entry's derivatives: d mu/dW, the mean input patch of each group (:func:`mean_patches`), and
d nu/dW, the producer's weight-gradient reduction (for a conv on torch's kernel,
:func:`bnlab.functional.conv_weight_gradient`; for a Linear here), and their products with W_p.
The window's per-channel statistics and those products are float64, and so are the sums of
products above: nu and <d nu/dW, W> are of the size of mu^2, and the pooled variance is a
difference of such numbers (in float32 a channel whose mean was 1,000 times its spread lost
its variance whole). The backward
(:func:`bnlab.kernels.cpu_fused.pooled_backward`) is BN's with the statistics' share 1/k.

:meth:`bnlab.CrossIterationBatchNorm._train_torch` is the same step in torch ops; the tests hold
the two to the same results.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from bnlab.kernels.cpu_fused import FASTMATH, channel_moments, fold_running
from bnlab.kernels.cpu_fused import pooled_backward as pooled_backward  # this module's backward: BN's, k iterations


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def pooled_forward(x, gamma, beta, eps, pool_past, weight, bias, win_mu, win_nu, win_bias, win_dmu, win_dnu,
                   win_dmu_w, win_dnu_w, valid, compensate, y, mean, var, mu_bar, invstd):
    """Channels-first ``x (N, C, S)``: the pooled normalization. Writes ``y``, the batch's ``mean`` and
    biased ``var``, the pooled ``mu_bar`` and ``invstd``; returns k, the number of iterations pooled
    (1, which is BN, when not ``pool_past``).

    ``weight`` ``(C, F)`` and ``bias`` ``(C,)`` are the producer's now (zeros without a bias); the
    window arrays are the layer's buffers (``win_dmu (P, G, F)``, ``win_dnu (P, C, F)``; empty and
    unused when not ``compensate``).
    """
    n_, c_, s_ = x.shape
    past = win_mu.shape[0] if pool_past else 0
    k = 1
    for p in range(past):
        if valid[p]:
            k += 1
    per_group = c_ // win_dmu.shape[1] if compensate else 1
    for c in prange(c_):
        mu, v = channel_moments(x, c)
        mean[c] = mu
        var[c] = v
        sum_mu = mu
        sum_nu = v + mu * mu
        for p in range(past):
            if not valid[p]:
                continue
            mu_p = np.float64(win_mu[p, c])
            nu_p = np.float64(win_nu[p, c])
            if compensate:
                t_mu, t_nu = _products_with(weight, p, c, c // per_group, win_dmu, win_dnu)
                db = np.float64(bias[c]) - win_bias[p, c]
                nu_p = nu_p + t_nu - win_dnu_w[p, c] + 2.0 * mu_p * db
                mu_p = mu_p + t_mu - win_dmu_w[p, c] + db
            sum_mu += mu_p
            sum_nu += max(nu_p, mu_p * mu_p)
        mb = sum_mu / k
        inv = 1.0 / math.sqrt(max(sum_nu / k - mb * mb, 0.0) + eps)
        mu_bar[c] = mb
        invstd[c] = inv
        scale = x.dtype.type(gamma[c] * inv)
        offset = x.dtype.type(beta[c] - mb * gamma[c] * inv)
        for n in range(n_):
            xr, out = x[n, c], y[n, c]
            for s in range(s_):
                out[s] = xr[s] * scale + offset
    return k


@numba.njit(cache=True)
def commit(stats, m, running_mean, running_var, momentum, slot, bias, win_mu, win_nu, win_bias, valid, compensate):
    """Fold the batch (``stats`` rows 0 and 1: its mean and biased variance) into the running
    statistics (unbiased variance m/(m-1) sigma2) and make it window entry ``slot`` (when >= 0):
    its mean, second moment and (compensated) the producer's bias; the store kernels then write
    its derivatives. Returns False, changing nothing, when its statistics are not finite in the
    buffers' dtype."""
    mean, var = stats[0], stats[1]
    c_ = mean.shape[0]
    if not fold_running(mean, var, m, running_mean, running_var, momentum):
        return False
    if slot >= 0:
        for c in range(c_):
            win_mu[slot, c] = mean[c]
            win_nu[slot, c] = var[c] + mean[c] * mean[c]
            if compensate:
                win_bias[slot, c] = bias[c]
        valid[slot] = True
    return True


@numba.njit(cache=True, fastmath=FASTMATH, inline="always")  # (in the callers' loops: as fast as written there)
def _products_with(weight, p, c, g, win_dmu, win_dnu):
    """<d mu_c/dW_c, W_c> and <d nu_c/dW_c, W_c> for window entry ``p``'s stored derivatives (group
    ``g``'s mean patch) and the producer's ``weight`` rows, summed in float64: <d nu/dW, W> is of
    the size of mu^2 and the compensation takes differences of such products; float32 values
    multiply exactly in float64."""
    t_mu = 0.0
    t_nu = 0.0
    for f in range(weight.shape[1]):
        w = np.float64(weight[c, f])
        t_mu += np.float64(win_dmu[p, g, f]) * w
        t_nu += np.float64(win_dnu[p, c, f]) * w
    return t_mu, t_nu


@numba.njit(cache=True, fastmath=FASTMATH)
def _weight_products(slot, c, weight, win_dmu, win_dnu, win_dmu_w, win_dnu_w):
    """Channel ``c``'s products of entry ``slot``'s stored derivatives with the producer's weight
    now (:func:`_products_with`), into ``win_dmu_w``/``win_dnu_w``.

    (In exact arithmetic they are mu_c - b_c and 2 (nu_c - b_c mu_c), as x_c = <W_c, patch> + b_c.
    But pooled_forward subtracts them from the same products at later weights, and only products
    of the same rounded derivatives cancel to their difference, <d nu/dW, W_t - W_p>.)"""
    g = c // (win_dnu.shape[1] // win_dmu.shape[1])
    win_dmu_w[slot, c], win_dnu_w[slot, c] = _products_with(weight, slot, c, g, win_dmu, win_dnu)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def store_conv(slot, u, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, dnu, dnu_scale, weight, win_dmu,
               win_dnu, win_dmu_w, win_dnu_w):
    """Window entry ``slot``'s derivatives for a Conv2d producer: d mu/dW (:func:`mean_patches` of
    its input ``u``) and d nu/dW = ``dnu_scale * dnu`` (``dnu`` ``(C, F)`` from torch's
    weight-gradient kernel), and their products with the producer's ``weight`` ``(C, F)``
    (:func:`_weight_products`)."""
    groups, f_ = win_dmu.shape[1], win_dmu.shape[2]
    patches = np.empty((groups, f_))
    mean_patches(u, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, patches)
    for g in range(groups):
        for f in range(f_):
            win_dmu[slot, g, f] = patches[g, f]
    for c in prange(dnu.shape[0]):
        for f in range(f_):
            win_dnu[slot, c, f] = dnu[c, f] * dnu_scale
        _weight_products(slot, c, weight, win_dmu, win_dnu, win_dmu_w, win_dnu_w)


POSITIONS_PER_CHUNK = 4096  # at most (but one image row) the output positions of a chunk of store_conv_moments


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def store_conv_moments(slot, u, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, weight, bias, win_dmu,
                       win_dnu, win_dmu_w, win_dnu_w):
    """Window entry ``slot``'s derivatives for a Conv2d producer of one group, from the second
    moments of its input patches instead of a weight-gradient reduction.

    With x_c(p) = <W_c, P(p)> + b_c over the m output positions p (``weight`` ``(C, F)``, ``bias``):
        d nu_c/dW_c = 2/m sum_p x_c(p) P(p) = 2/m (W_c S + b_c s),
        S = sum_p P(p) P(p)^T (F x F),  s = sum_p P(p) = m d mu/dW,
    F (F + 1) / 2 products a position (and C F^2 for W S) instead of the reduction's C F; then
    the products with ``weight`` (:func:`_weight_products`). Any
    geometry gives the same values; it is the faster one only for a first conv over a few input
    channels, at stride 1 along the width, where the patches' rows are copies (the layer's rule:
    :func:`bnlab.functional.moments_pay`). Threads split the batch into chunks of output
    rows of one image; each lays out its patches and sums their products in the input's dtype
    (as torch's weight gradient sums them), and the chunks add up in float64.
    """
    n_, c_in, h, w = u.shape
    oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    f_ = c_in * kh * kw
    rows = min(oh, max(1, POSITIONS_PER_CHUNK // ow))  # output rows of one image a chunk
    per_image = (oh + rows - 1) // rows
    partial = np.zeros((n_ * per_image, f_, f_))
    for k in prange(n_ * per_image):
        n, a0 = k // per_image, k % per_image * rows
        a1 = min(oh, a0 + rows)
        patches = np.empty((f_, (a1 - a0) * ow), dtype=u.dtype)
        _lay_out_patches(u, n, a0, a1, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, patches)
        _upper_gram(patches, partial[k])
    second = np.zeros((f_, f_))
    for k in range(n_ * per_image):
        for f1 in range(f_):
            for f2 in range(f1, f_):
                second[f1, f2] += partial[k, f1, f2]
    for f1 in range(f_):
        for f2 in range(f1):
            second[f1, f2] = second[f2, f1]
    mean = np.empty((1, f_))
    mean_patches(u, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, 1, mean)
    for f in range(f_):
        win_dmu[slot, 0, f] = mean[0, f]
    scale = 2.0 / (n_ * oh * ow)
    for c in range(weight.shape[0]):
        for f2 in range(f_):
            t = 0.0
            for f1 in range(f_):
                t += np.float64(weight[c, f1]) * second[f1, f2]
            win_dnu[slot, c, f2] = t * scale + 2.0 * bias[c] * mean[0, f2]
        _weight_products(slot, c, weight, win_dmu, win_dnu, win_dmu_w, win_dnu_w)


@numba.njit(cache=True, fastmath=FASTMATH)
def _lay_out_patches(u, n, a0, a1, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out):
    """Image ``n``'s patches at output rows [a0, a1): ``out[f, (a - a0) * OW + b]`` = patch entry f
    (the weight's order) at output position (a, b), zero in the padding."""
    _, c_in, h, w = u.shape
    ow = out.shape[1] // max(a1 - a0, 1)
    for ci in range(c_in):
        for i in range(kh):
            for j in range(kw):
                col = out[(ci * kh + i) * kw + j]
                for a in range(a0, a1):
                    r = a * stride_h + i * dil_h - pad_h
                    base = (a - a0) * ow
                    if r < 0 or r >= h:
                        col[base:base + ow] = 0
                        continue
                    src = u[n, ci, r]
                    for b in range(ow):
                        q = b * stride_w + j * dil_w - pad_w
                        col[base + b] = src[q] if 0 <= q < w else 0


@numba.njit(cache=True, fastmath=FASTMATH)
def _upper_gram(rows, out):
    """``out[f1, f2]`` = <rows[f1], rows[f2]> for f1 <= f2 (and some f1 > f2), summed in the rows'
    dtype, two rows by two rows: four products for four loads."""
    f_, m = rows.shape
    zero = rows.dtype.type(0)
    for f1 in range(0, f_, 2):
        g1 = min(f1 + 1, f_ - 1)  # (an odd last row pairs with itself)
        a, b = rows[f1], rows[g1]
        for f2 in range(f1, f_, 2):
            g2 = min(f2 + 1, f_ - 1)
            c, d = rows[f2], rows[g2]
            t00, t01, t10, t11 = zero, zero, zero, zero
            for p in range(m):
                t00 += a[p] * c[p]
                t01 += a[p] * d[p]
                t10 += b[p] * c[p]
                t11 += b[p] * d[p]
            out[f1, f2], out[f1, g2], out[g1, f2], out[g1, g2] = t00, t01, t10, t11


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def store_linear(slot, x, u, weight, win_dmu, win_dnu, win_dmu_w, win_dnu_w):
    """Window entry ``slot``'s derivatives for a Linear producer, ``x (N, C) = u (N, F) W^T + b``:
    d mu/dW = the mean row of u; d nu_c/dW_c = 2/N sum_n x[n, c] u[n] (outer products accumulated
    row by row, straight into the window: torch's ``x^T @ u`` at a small N runs several times
    slower, ``(u^T @ x)^T`` comes out transposed); then their products with ``weight``
    (:func:`_weight_products`)."""
    n_, c_ = x.shape
    f_ = u.shape[1]
    dmu = win_dmu[slot, 0]
    dmu[:] = 0
    for n in range(n_):
        for f in range(f_):
            dmu[f] += u[n, f]
    for f in range(f_):
        dmu[f] /= n_
    scale = x.dtype.type(2.0 / n_)
    for c in prange(c_):
        row = win_dnu[slot, c]
        row[:] = 0
        for n in range(n_):
            a = x[n, c] * scale
            un = u[n]
            for f in range(f_):
                row[f] += a * un[f]
        _weight_products(slot, c, weight, win_dmu, win_dnu, win_dmu_w, win_dnu_w)


@numba.njit(cache=True, fastmath=FASTMATH)
def _reach(out_size, size, stride, offset):
    """The output positions a whose input position a * stride + offset lies in [0, size): (first, end)."""
    first = max(0, (-offset + stride - 1) // stride)
    end = min(out_size, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return first, max(first, end)


@numba.njit(cache=True, fastmath=FASTMATH)
def mean_patches(u, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, out):
    """d mu/dW of a Conv2d (a Linear is the 1x1 case): the mean over the batch and the output
    positions of each group's input patch, ``out (G, C_in/G * kh * kw)`` in the weight's order.

    Patches are linear in the input, so the batch is summed first (``u`` contiguous); then each
    (channel, kernel offset) sums the part of the summed image that the output positions reach
    (zero padding adds nothing): a rectangle, read off 2-D prefix sums at stride 1.
    """
    n_, c_in, h, w = u.shape
    oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    flat = u.reshape(n_, c_in * h * w)
    summed = np.zeros(c_in * h * w)
    for n in range(n_):
        for v in range(c_in * h * w):
            summed[v] += flat[n, v]
    image = summed.reshape(c_in, h, w)
    unit_stride = stride_h == 1 and stride_w == 1
    prefix = np.zeros((c_in, h + 1, w + 1) if unit_stride else (0, 0, 0))  # prefix[c, r, q] = sum of image[c, :r, :q]
    if unit_stride:
        for ci in range(c_in):
            for r in range(h):
                run = 0.0
                for q in range(w):
                    run += image[ci, r, q]
                    prefix[ci, r + 1, q + 1] = prefix[ci, r, q + 1] + run
    per_group = c_in // groups
    scale = 1.0 / (n_ * oh * ow)
    for i in range(kh):
        a0, a1 = _reach(oh, h, stride_h, i * dil_h - pad_h)
        for j in range(kw):
            b0, b1 = _reach(ow, w, stride_w, j * dil_w - pad_w)
            for ci in range(c_in):
                total = 0.0
                if a1 > a0 and b1 > b0 and unit_stride:
                    r0, r1 = a0 + i * dil_h - pad_h, a1 + i * dil_h - pad_h
                    q0, q1 = b0 + j * dil_w - pad_w, b1 + j * dil_w - pad_w
                    total = prefix[ci, r1, q1] - prefix[ci, r0, q1] - prefix[ci, r1, q0] + prefix[ci, r0, q0]
                elif not unit_stride:
                    for a in range(a0, a1):
                        row = image[ci, a * stride_h + i * dil_h - pad_h]
                        for b in range(b0, b1):
                            total += row[b * stride_w + j * dil_w - pad_w]
                out[ci // per_group, (ci % per_group * kh + i) * kw + j] = total * scale
