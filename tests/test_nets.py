"""The hand-written training step of the MNIST networks against autograd + torch.optim.SGD."""

import copy

import pytest
import torch

from bnlab.nets import BinaryInputSGD, SigmoidMLP, active_inputs


def binary(n, d, seed):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) > 0.7).double()


def test_active_inputs_lists_every_one_and_only_ones():
    x = binary(9, 13, 0)
    x[3] = 0  # an empty row
    index, mask = active_inputs(x)
    rebuilt = torch.zeros_like(x).scatter_add_(1, index, mask)
    assert torch.equal(rebuilt, x)
    assert index.shape[1] == int(x.sum(1).max())
    with pytest.raises(ValueError, match="binary"):
        active_inputs(x * 0.5)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_hand_written_step_equals_autograd_and_sgd(batch_norm):
    torch.manual_seed(0)
    sizes = (20, 7, 6, 5, 4)
    model = SigmoidMLP(sizes, batch_norm=batch_norm, init_std=0.5).double()
    twin = copy.deepcopy(model)
    sgd = BinaryInputSGD(model, lr=0.3)
    opt = torch.optim.SGD(twin.parameters(), lr=0.3)
    for step in range(4):
        x = binary(10, 20, step)
        y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(100 + step))
        index, mask = active_inputs(x)
        sgd.step(x, index, mask, torch.nn.functional.one_hot(y, 4).double())
        loss = torch.nn.functional.cross_entropy(twin(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sgd.sync_()
    expected = twin.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-12, msg=key)
    if batch_norm:
        assert int(model.norms[0].num_batches_tracked) == 4


def test_first_layer_and_head_compose_to_forward():
    torch.manual_seed(1)
    model = SigmoidMLP((12, 5, 3), batch_norm=False).double()
    x = binary(6, 12, 3)
    sgd = BinaryInputSGD(model, lr=0.1)
    torch.testing.assert_close(model.head(sgd.first_layer(*active_inputs(x))), model(x))
    linear_ref = torch.sigmoid(torch.nn.functional.linear(x, model.linears[0].weight, model.linears[0].bias))
    torch.testing.assert_close(model.linears[1](linear_ref), model(x))
