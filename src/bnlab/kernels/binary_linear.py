"""A linear layer on binary inputs, as sparse loops compiled by numba (CPU).

With x in {0, 1}^(B x D), the layer's forward and its SGD weight update are sums of rows:

    forward:  z[b] = sum_{j active in x_b} W^T[j]                        (= x W^T)
    update:   W^T[j] += alpha * sum_{b : j active in x_b} dz[b]          (= W^T + alpha x^T dz)

MNIST's binarized digits have about 100 active pixels of 784, so both do about an eighth of the
additions of the dense products, and the update writes only the rows the batch touches. Examples
are read straight from the whole training set's tables through ``ids``: no batch is copied.
Measured on the 2-core CPU of our machines, a batch of 60 MNIST digits into 100 units: forward
about 45 us and update about 41 us, against 110 us and 99 us for torch's dense products.
The summation order differs from a dense product's; the values agree with it to rounding.
"""

from __future__ import annotations

import numba
import numpy as np


def active_lists(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's active inputs, as one flat list: ``(index, starts)``.

    Row i's active inputs are ``index[starts[i]:starts[i + 1]]``, increasing. ``index`` is int16
    when the inputs number fewer than 2^15 (MNIST's 60,000 images fit in 12 MB, in cache).
    """
    x = np.asarray(x)
    if x.dtype != np.bool_:
        if not ((x == 0) | (x == 1)).all():
            raise ValueError("binary inputs must be 0 or 1")
        x = x.astype(bool)
    _, cols = np.nonzero(x)  # row-major: each row's columns in increasing order
    starts = np.zeros(x.shape[0] + 1, np.int64)
    np.cumsum(np.count_nonzero(x, axis=1), out=starts[1:])
    return cols.astype(np.int16 if x.shape[1] < 2**15 else np.int32), starts


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _touch(ids, index, starts):
    """Read one value per cache line of each example's list, all lists at once: the misses overlap
    (a random batch's lists are cold; read one after the other, each would stall on its own)."""
    total = 0
    for b in range(ids.shape[0]):
        for k in range(starts[ids[b]], starts[ids[b] + 1], 16):
            total += index[k]
    return total


@numba.njit(cache=True, nogil=True, boundscheck=False)
def binary_forward(ids, index, starts, w_t, out):
    """out[b] = x_{ids[b]} W^T: the sum of ``w_t``'s rows of example ids[b]'s active inputs."""
    _touch(ids, index, starts)
    width = out.shape[1]
    for b in range(ids.shape[0]):
        row = ids[b]
        acc = out[b]
        acc[:] = 0
        for k in range(starts[row], starts[row + 1]):
            w = w_t[index[k]]
            for h in range(width):
                acc[h] += w[h]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def binary_update(ids, index, starts, dz, w_t, alpha, scaled):
    """w_t += alpha x^T dz: each example's ``alpha * dz[b]`` added to the rows of its active inputs.

    ``scaled`` is scratch space of one row.
    """
    width = dz.shape[1]
    for b in range(ids.shape[0]):
        row = ids[b]
        for h in range(width):
            scaled[h] = alpha * dz[b, h]
        for k in range(starts[row], starts[row + 1]):
            w = w_t[index[k]]
            for h in range(width):
                w[h] += scaled[h]


def warm_up() -> None:
    """Compile (or load from numba's cache) both kernels now, e.g. once before forking workers."""
    ids, starts = np.zeros(1, np.int64), np.array([0, 1], np.int64)
    index = np.zeros(1, np.int16)
    for dtype in (np.float32, np.float64):
        w_t, row = np.zeros((1, 1), dtype), np.zeros((1, 1), dtype)
        binary_forward(ids, index, starts, w_t, row)
        binary_update(ids, index, starts, row, w_t, dtype(0), np.zeros(1, dtype))
