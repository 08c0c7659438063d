"""The papers' formulas in NumPy float64: the executable specification of bnlab.

Ioffe & Szegedy 2015 (arXiv 1502.03167): Algorithm 1 (training forward), the backpropagation
formulas of section 3, Algorithm 2 (inference with population statistics), and the convolutional
form of section 3.2. Symbols follow the paper (``mu_B``, ``sigma2_B``, ``x_hat``, ``m``) so this file
can be read beside the PDF. Nothing here is fast and nothing here imports torch: tests compare the
PyTorch implementation against these functions in float64.

Layout convention: an activation tensor is either ``(m, d)`` (fully connected: ``m`` examples, ``d``
activations, statistics per activation over ``m``) or ``(N, C, *spatial)`` (convolutional: statistics
per channel over ``N * prod(spatial)`` values, the paper's effective mini-batch ``m' = m * p * q``).
"""

from __future__ import annotations

import numpy as np


def to_rows(x: np.ndarray) -> np.ndarray:
    """Ioffe & Szegedy 2015, section 3.2: the convolutional form as a fully connected one.

    Every position of a feature map is one more example of its channel, so ``(N, C, *spatial)``
    becomes ``(N * prod(spatial), C)``; ``(m, d)`` is returned as it is.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        return x
    n, c = x.shape[:2]
    # (N, C, *S) -> (N, *S, C) -> (N*prod(S), C)
    return np.moveaxis(x.reshape(n, c, -1), 1, 2).reshape(-1, c)


def from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_rows` for an activation of the given ``shape``."""
    if len(shape) == 2:
        return rows
    n, c = shape[:2]
    # (N*prod(S), C) -> (N, prod(S), C) -> (N, C, prod(S)) -> (N, C, *S)
    return np.moveaxis(rows.reshape(n, -1, c), 2, 1).reshape(shape)


def batch_norm_train(x, gamma, beta, eps=1e-5):
    """Ioffe & Szegedy 2015, Algorithm 1: Batch Normalizing Transform over a mini-batch.

    mu_B = 1/m sum_i x_i;  sigma2_B = 1/m sum_i (x_i - mu_B)^2  (biased);
    x_hat_i = (x_i - mu_B) / sqrt(sigma2_B + eps);  y_i = gamma * x_hat_i + beta.

    Args:
        x: ``(m, d)`` or ``(N, C, *spatial)`` activations.
        gamma, beta: ``(d,)`` scale and shift, one per activation (per channel).
        eps: added to the variance inside the square root.

    Returns:
        dict with ``y`` (shape of ``x``), ``mu_B``, ``sigma2_B`` (``(d,)``), ``x_hat`` (shape of
        ``x``) and ``m`` (values per statistic).
    """
    shape = np.shape(x)
    rows = to_rows(x)
    m = rows.shape[0]
    mu_B = rows.sum(axis=0) / m
    sigma2_B = ((rows - mu_B) ** 2).sum(axis=0) / m
    x_hat = (rows - mu_B) / np.sqrt(sigma2_B + eps)
    y = np.asarray(gamma, np.float64) * x_hat + np.asarray(beta, np.float64)
    return {
        "y": from_rows(y, shape),
        "mu_B": mu_B,
        "sigma2_B": sigma2_B,
        "x_hat": from_rows(x_hat, shape),
        "m": m,
    }


def batch_norm_backward(dl_dy, x, gamma, eps=1e-5):
    """Ioffe & Szegedy 2015, section 3: the backpropagation formulas exactly as printed.

    dl/dx_hat  = dl/dy * gamma
    dl/dsigma2 = sum_i dl/dx_hat_i * (x_i - mu_B) * (-1/2) * (sigma2_B + eps)^(-3/2)
    dl/dmu_B   = sum_i dl/dx_hat_i * (-1/sqrt(sigma2_B + eps)) + dl/dsigma2 * sum_i -2(x_i - mu_B) / m
    dl/dx_i    = dl/dx_hat_i / sqrt(sigma2_B + eps) + dl/dsigma2 * 2(x_i - mu_B)/m + dl/dmu_B / m
    dl/dgamma  = sum_i dl/dy_i * x_hat_i
    dl/dbeta   = sum_i dl/dy_i

    The second term of dl/dmu_B is zero in exact arithmetic (the deviations sum to zero); it is
    kept because the paper prints it.

    Returns:
        dict with ``dx`` (shape of ``x``), ``dgamma``, ``dbeta``, ``dx_hat``, ``dsigma2``, ``dmu``.
    """
    shape = np.shape(x)
    rows = to_rows(x)
    dy = to_rows(dl_dy)
    m = rows.shape[0]
    gamma = np.asarray(gamma, np.float64)
    mu_B = rows.sum(axis=0) / m
    sigma2_B = ((rows - mu_B) ** 2).sum(axis=0) / m
    x_hat = (rows - mu_B) / np.sqrt(sigma2_B + eps)

    dx_hat = dy * gamma
    dsigma2 = (dx_hat * (rows - mu_B) * -0.5 * (sigma2_B + eps) ** -1.5).sum(axis=0)
    dmu = (dx_hat * (-1.0 / np.sqrt(sigma2_B + eps))).sum(axis=0) + dsigma2 * (
        -2.0 * (rows - mu_B)
    ).sum(axis=0) / m
    dx = dx_hat / np.sqrt(sigma2_B + eps) + dsigma2 * 2.0 * (rows - mu_B) / m + dmu / m
    dgamma = (dy * x_hat).sum(axis=0)
    dbeta = dy.sum(axis=0)
    return {
        "dx": from_rows(dx, shape),
        "dgamma": dgamma,
        "dbeta": dbeta,
        "dx_hat": from_rows(dx_hat, shape),
        "dsigma2": dsigma2,
        "dmu": dmu,
    }


def population_statistics(mu_Bs, sigma2_Bs, m):
    """Ioffe & Szegedy 2015, Algorithm 2, step 10: population statistics from mini-batches.

    E[x] = E_B[mu_B];  Var[x] = m / (m - 1) * E_B[sigma2_B]   (unbiased estimate of the variance).

    Args:
        mu_Bs, sigma2_Bs: ``(batches, d)`` per-batch means and biased variances.
        m: values per statistic in each batch (``N * prod(spatial)`` for convolutions).

    Returns:
        ``(E_x, Var_x)``, each ``(d,)``.
    """
    if m < 2:
        raise ValueError(f"Algorithm 2 needs m >= 2 values per statistic, got m={m}")
    E_x = np.mean(np.asarray(mu_Bs, np.float64), axis=0)
    Var_x = m / (m - 1) * np.mean(np.asarray(sigma2_Bs, np.float64), axis=0)
    return E_x, Var_x


def batch_norm_inference(x, gamma, beta, E_x, Var_x, eps=1e-5):
    """Ioffe & Szegedy 2015, Algorithm 2, step 11: the inference transform.

    y = gamma / sqrt(Var[x] + eps) * x + (beta - gamma * E[x] / sqrt(Var[x] + eps)),
    a fixed affine map of ``x`` per activation (per channel).
    """
    shape = np.shape(x)
    rows = to_rows(x)
    gamma = np.asarray(gamma, np.float64)
    scale = gamma / np.sqrt(np.asarray(Var_x, np.float64) + eps)
    shift = np.asarray(beta, np.float64) - gamma * np.asarray(E_x, np.float64) / np.sqrt(
        np.asarray(Var_x, np.float64) + eps
    )
    return from_rows(rows * scale + shift, shape)


def running_average(running, batch, momentum):
    """Exponential moving average in PyTorch's convention (momentum = weight of the new batch).

    running_new = (1 - momentum) * running + momentum * batch. Keras' ``momentum=0.99`` is
    PyTorch's ``momentum=0.01``.
    """
    return (1.0 - momentum) * np.asarray(running, np.float64) + momentum * np.asarray(batch, np.float64)


def cumulative_average(running, batch, count):
    """Equal-weight average of ``count`` batches (PyTorch's ``momentum=None``), updated online.

    running_new = running + (batch - running) / count, where ``count`` includes the new batch.
    """
    return np.asarray(running, np.float64) + (np.asarray(batch, np.float64) - running) / count


def batch_renorm_train(x, gamma, beta, mu, sigma, r_max, d_max, eps=1e-5):
    """Ioffe 2017 (Batch Renormalization), Algorithm 1, training.

    sigma_B = sqrt(sigma2_B + eps);  r = clip(sigma_B / sigma, 1/r_max, r_max);
    d = clip((mu_B - mu) / sigma, -d_max, d_max);  x_hat = (x - mu_B) / sigma_B * r + d;
    y = gamma * x_hat + beta. r and d are constants in backprop. ``mu``, ``sigma``: the moving mean
    and standard deviation.

    Returns:
        dict with ``y``, ``mu_B``, ``sigma_B``, ``r``, ``d``.
    """
    shape = np.shape(x)
    rows = to_rows(x)
    m = rows.shape[0]
    mu_B = rows.sum(axis=0) / m
    sigma_B = np.sqrt(((rows - mu_B) ** 2).sum(axis=0) / m + eps)
    r = np.clip(sigma_B / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_B - mu) / sigma, -d_max, d_max)
    x_hat = (rows - mu_B) / sigma_B * r + d
    y = np.asarray(gamma, np.float64) * x_hat + np.asarray(beta, np.float64)
    return {"y": from_rows(y, shape), "mu_B": mu_B, "sigma_B": sigma_B, "r": r, "d": d}


def ghost_batch_norm_train(x, gamma, beta, virtual_batch_size, eps=1e-5):
    """Ghost Batch Normalization (Hoffer et al. 2017): Algorithm 1 on each virtual sub-batch.

    The batch is split along its first dimension into consecutive chunks of
    ``virtual_batch_size`` examples (the last may be smaller), each normalized with its own
    statistics. Returns ``y`` and the per-chunk ``mu_B``, ``sigma2_B`` and ``m``.
    """
    x = np.asarray(x, np.float64)
    outs, mus, vars_, ms = [], [], [], []
    for start in range(0, x.shape[0], virtual_batch_size):
        out = batch_norm_train(x[start : start + virtual_batch_size], gamma, beta, eps)
        outs.append(out["y"])
        mus.append(out["mu_B"])
        vars_.append(out["sigma2_B"])
        ms.append(out["m"])
    return {"y": np.concatenate(outs), "mu_B": np.array(mus), "sigma2_B": np.array(vars_), "m": ms}


def cross_iteration_statistics(mus, nus, dmus, dnus, weights, biases, weight_now, bias_now, compensate=True):
    """Yao et al. 2020 (Cross-Iteration BN), equations 7-9, for a producer with weight rows W_j.

    Window entries tau = 0..k-1 (entry 0 the current iteration) hold the per-channel mean mu and
    second moment nu of the producer's output, their derivatives with respect to the producer's
    weight (W-shaped: row j is d mu_j / d W_j) and the weight and bias they were taken at.
    Compensated to the current weight by a first-order Taylor expansion:
        mu_j(theta_t) ~ mu_j + <d mu_j / d W_j, W_t,j - W_j> + (b_t,j - b_j)
        nu_j(theta_t) ~ nu_j + <d nu_j / d W_j, W_t,j - W_j> + 2 mu_j (b_t,j - b_j)
    Pooled: mu = mean of the compensated mu; nu = mean of max(nu, mu^2); sigma2 = nu - mu^2.

    Returns:
        ``(mu_bar, sigma2_bar)``, each ``(C,)``.
    """
    k = len(mus)
    mu_c, nu_c = [], []
    for tau in range(k):
        mu, nu = np.asarray(mus[tau], np.float64), np.asarray(nus[tau], np.float64)
        if compensate and tau > 0:
            dW = (np.asarray(weight_now, np.float64) - np.asarray(weights[tau], np.float64)).reshape(len(mu), -1)
            db = np.zeros(len(mu)) if bias_now is None else np.asarray(bias_now) - np.asarray(biases[tau])
            mu = mu + (np.asarray(dmus[tau]).reshape(len(mu), -1) * dW).sum(1) + db
            nu = nu + (np.asarray(dnus[tau]).reshape(len(mu), -1) * dW).sum(1) + 2 * np.asarray(mus[tau]) * db
        mu_c.append(mu)
        nu_c.append(np.maximum(nu, mu**2))
    mu_bar = np.mean(mu_c, axis=0)
    nu_bar = np.mean(nu_c, axis=0)
    return mu_bar, nu_bar - mu_bar**2
