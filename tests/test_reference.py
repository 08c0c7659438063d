"""The NumPy reference checked against itself: finite differences and hand-computed cases."""

import numpy as np
import pytest

from bnlab import reference as R


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        fp = f()
        x[i] = old - eps
        fm = f()
        x[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 2, 3)])
def test_backward_formulas_match_finite_differences(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    c = shape[1]
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    w = rng.normal(size=shape)  # loss = sum(w * y)

    def loss():
        return float(np.sum(w * R.batch_norm_train(x, gamma, beta)["y"]))

    grads = R.batch_norm_backward(w, x, gamma)
    assert np.max(np.abs(grads["dx"] - numeric_grad(loss, x))) < 1e-6
    assert np.max(np.abs(grads["dgamma"] - numeric_grad(loss, gamma))) < 1e-6
    assert np.max(np.abs(grads["dbeta"] - numeric_grad(loss, beta))) < 1e-6


def test_algorithm1_normalizes_each_activation():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
    out = R.batch_norm_train(x, np.ones(2), np.zeros(2), eps=0.0)
    np.testing.assert_allclose(out["mu_B"], [3.0, 12.0])
    np.testing.assert_allclose(out["sigma2_B"], [8 / 3, 8.0])
    np.testing.assert_allclose(out["y"][:, 0], np.array([-2.0, 0.0, 2.0]) / np.sqrt(8 / 3))


def test_convolutional_form_pools_batch_and_positions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 2, 4, 5))
    out = R.batch_norm_train(x, np.ones(2), np.zeros(2))
    assert out["m"] == 3 * 4 * 5
    np.testing.assert_allclose(out["mu_B"], x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(out["sigma2_B"], x.var(axis=(0, 2, 3)))
    np.testing.assert_allclose(R.from_rows(R.to_rows(x), x.shape), x)


def test_algorithm2_unbiased_population_variance_and_affine_inference():
    mu_Bs = np.array([[0.0, 1.0], [2.0, 3.0]])
    sigma2_Bs = np.array([[1.0, 2.0], [3.0, 4.0]])
    E_x, Var_x = R.population_statistics(mu_Bs, sigma2_Bs, m=5)
    np.testing.assert_allclose(E_x, [1.0, 2.0])
    np.testing.assert_allclose(Var_x, [5 / 4 * 2.0, 5 / 4 * 3.0])
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    y = R.batch_norm_inference(x, np.array([2.0, 1.0]), np.array([0.5, 0.0]), E_x, Var_x, eps=0.0)
    np.testing.assert_allclose(y, 2.0 * (x - E_x) / np.sqrt(Var_x) * [1, 0.5] + [0.5, 0.0])
    with pytest.raises(ValueError, match="m >= 2"):
        R.population_statistics(mu_Bs, sigma2_Bs, m=1)


def test_running_average_conventions():
    np.testing.assert_allclose(R.running_average(1.0, 3.0, 0.1), 1.2)
    values = [2.0, 4.0, 9.0]
    r = 0.0
    for t, v in enumerate(values, start=1):
        r = R.cumulative_average(r, v, t)
    np.testing.assert_allclose(r, np.mean(values))
