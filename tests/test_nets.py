"""The hand-written training step of the MNIST networks against autograd + torch.optim.SGD."""

import copy

import numpy as np
import pytest
import torch

from bnlab.kernels.binary_linear import active_lists, binary_forward, binary_update
from bnlab.nets import BinaryInputSGD, SigmoidMLP, flat_active_inputs


def binary(n, d, seed):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) > 0.7).double()


def test_active_lists_hold_every_one_and_only_ones():
    x = binary(9, 13, 0).numpy()
    x[3] = 0  # an empty row
    index, starts = active_lists(x)
    rebuilt = np.zeros_like(x)
    for i in range(len(x)):
        rebuilt[i, index[starts[i] : starts[i + 1]]] = 1
    assert np.array_equal(rebuilt, x) and index.dtype == np.int16 and starts[-1] == x.sum()
    with pytest.raises(ValueError, match="binary"):
        active_lists(x * 0.5)
    with pytest.raises(ValueError, match="binary"):
        flat_active_inputs(torch.from_numpy(x) * 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_kernels_equal_the_dense_products(dtype):
    x = binary(40, 30, 1).numpy().astype(dtype)
    index, starts = active_lists(x)
    rng = np.random.default_rng(0)
    w_t, dz = rng.normal(size=(30, 8)).astype(dtype), rng.normal(size=(12, 8)).astype(dtype)
    ids = rng.integers(0, 40, 12)  # with repeats, as random batches have
    out = np.empty((12, 8), dtype)
    binary_forward(ids, index, starts, w_t, out)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(out, x[ids] @ w_t, rtol=tol, atol=tol)
    updated = w_t.copy()
    binary_update(ids, index, starts, dz, updated, dtype(-0.1), np.empty(8, dtype))
    np.testing.assert_allclose(updated, w_t - 0.1 * x[ids].T @ dz, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_hand_written_step_equals_autograd_and_sgd(batch_norm):
    torch.manual_seed(0)
    sizes = (20, 7, 6, 5, 4)
    data = binary(50, 20, 7)
    index, starts = (torch.from_numpy(a) for a in active_lists(data.numpy()))
    model = SigmoidMLP(sizes, batch_norm=batch_norm, init_std=0.5).double()
    twin = copy.deepcopy(model)
    sgd = BinaryInputSGD(model, lr=0.3, index=index, starts=starts)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    for step in range(4):
        ids = torch.randint(0, 50, (10,), generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(100 + step))
        sgd.step(ids, torch.nn.functional.one_hot(y, 4).double())
        loss = torch.nn.functional.cross_entropy(twin(data[ids]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sgd.sync_()
    expected = twin.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-12, msg=key)
    if batch_norm:
        assert int(model.norms[0].num_batches_tracked) == 4


def test_first_layer_paths_and_head_compose_to_forward():
    torch.manual_seed(1)
    model = SigmoidMLP((12, 5, 3), batch_norm=False).double()
    x = binary(6, 12, 3)
    index, starts = (torch.from_numpy(a) for a in active_lists(x.numpy()))
    sgd = BinaryInputSGD(model, lr=0.1, index=index, starts=starts)
    torch.testing.assert_close(model.head(sgd.first_layer(*flat_active_inputs(x))), model(x))
    torch.testing.assert_close(model.head(sgd.first_layer_of(torch.arange(6))), model(x))
    hidden = torch.sigmoid(torch.nn.functional.linear(x, model.linears[0].weight, model.linears[0].bias))
    torch.testing.assert_close(model.linears[1](hidden), model(x))
