"""The fused CPU BN + activation path against BN followed by the activation (the unfused path)."""

import multiprocessing
import queue as queue_module
import time

import pytest
import torch

import bnlab
from bnlab import functional as F

ACTS = [("identity", lambda u: u), ("relu", torch.relu),
        ("leaky_relu", lambda u: torch.nn.functional.leaky_relu(u, 0.2)), ("silu", torch.nn.functional.silu),
        ("sigmoid", torch.sigmoid)]
SHAPES = [(5, 7), (130, 40), (4, 3, 9), (3, 5, 4, 6), (2, 3, 1, 1), (1, 4, 3, 3), (2, 2, 2, 3, 2)]
FLOAT32_TOL = dict(rtol=1e-4, atol=1e-5)


LAYOUTS = [(shape, False) for shape in SHAPES] + [(shape, True) for shape in SHAPES if len(shape) == 4]


@pytest.mark.parametrize("act, reference", ACTS)
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
def test_fused_equals_bn_then_activation(act, reference, shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(shape[1], generator=g) + 0.5
    b = torch.randn(shape[1], generator=g)
    dy = torch.randn(shape, generator=g)
    results = []
    for backend in ("fused", "native"):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
        y, *_ = F.batch_norm_act_train(xi, wi, bi, 1e-5, act, 0.2, backend, rm, rv, 0.1)
        y.backward(dy)
        results.append((y, xi.grad, wi.grad, bi.grad, rm, rv))
    for fused, unfused in zip(*results):
        torch.testing.assert_close(fused, unfused, **FLOAT32_TOL)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert results[0][0].is_contiguous(memory_format=layout)  # the output keeps the input's layout
    expected = reference(torch.nn.functional.batch_norm(x, None, None, w, b, True))
    torch.testing.assert_close(results[0][0], expected, **FLOAT32_TOL)


@pytest.mark.parametrize("shape, channels_last", [((4, 6, 5, 5), False), ((4, 6, 5, 5), True), ((16, 6), False)],
                         ids=["NCHW", "channels_last", "N-by-C"])
@pytest.mark.parametrize("act", [None, "leaky_relu"], ids=["BN", "BN+leaky_relu"])
def test_an_in_place_activation_after_the_kernels_trains_as_one_out_of_place(act, shape, channels_last):
    """(nn.ReLU(inplace=True) after BN, as torchvision's ResNets have it, failed on the fused
    kernels: "Output 0 of BatchNormActFunction is a view and is being modified inplace".)"""
    torch.manual_seed(0)
    two_d = len(shape) == 2
    if act is None:
        layer = (bnlab.BatchNorm1d if two_d else bnlab.BatchNorm2d)(6, backend="fused", dtype=torch.float64)
    else:
        layer = (bnlab.BatchNormAct1d if two_d else bnlab.BatchNormAct2d)(6, act=act, backend="fused",
                                                                          dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grads = []
    for inplace in (True, False):
        xi = x.clone().requires_grad_()
        y = torch.nn.ReLU(inplace=inplace)(layer(xi))
        y.square().sum().backward()
        grads.append((y.detach(), xi.grad, layer.weight.grad.clone()))
        layer.weight.grad = None
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert grads[0][1].abs().max() > 0.1


def test_batch_norm_act_module_loads_bn_checkpoints_and_matches_bn_relu():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    bn(torch.randn(8, 4, 5, 5))
    layer = bnlab.BatchNormAct2d(4, act="relu")
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(16, 4, 20, 20)
    torch.testing.assert_close(layer(x), torch.relu(bn(x)), **FLOAT32_TOL)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(layer.state_dict()[key], bn.state_dict()[key], **FLOAT32_TOL)
    layer.eval(), bn.eval()
    torch.testing.assert_close(layer(x), torch.relu(bn(x)), **FLOAT32_TOL)
    assert "act='relu'" in repr(layer)
    with pytest.raises(ValueError, match="act must be"):
        bnlab.BatchNormAct1d(3, act="tanh")


def test_half_precision_falls_back_to_the_unfused_path():
    layer = bnlab.BatchNormAct2d(3, act="silu", dtype=torch.float32)
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.silu(torch.nn.functional.batch_norm(x.float(), None, None, training=True))
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_auto_fuses_only_where_the_kernels_won():
    """backend="auto" takes the fused kernels for ReLU / leaky ReLU on inputs with a spatial extent
    (channels-first or channels_last), and torch's for (N, C) inputs, SiLU and sigmoid, and small tensors."""
    from bnlab import functional as F

    big = torch.randn(8, 16, 32, 32)
    assert F.use_fused(big, "relu") and F.use_fused(big, "leaky_relu")
    assert not F.use_fused(big, "silu") and not F.use_fused(big, "sigmoid") and not F.use_fused(big, "identity")
    assert F.use_fused(big.contiguous(memory_format=torch.channels_last), "relu")
    assert not F.use_fused(big.transpose(2, 3), "relu")  # (neither layout: torch's kernels take it)
    assert not F.use_fused(torch.randn(4096, 64), "relu")  # (N, C)
    assert not F.use_fused(torch.randn(4096, 64, 1, 1), "relu")  # (N, C, 1, 1): rows too
    assert not F.use_fused(torch.randn(2, 2, 2, 2), "relu")  # too small to pay for a kernel call
    assert not F.use_fused(big.half(), "relu")


def _train_on_the_kernels(queue=None):
    """A few steps of the fused BN + activation (channels-first and channels_last) and of a
    cross-iteration BN network, all on the parallel numba kernels in this process: the outputs,
    input gradients and the network's state. In a forked child (``queue`` given) it runs with
    ``torch.set_num_threads(1)``, torch's own rule after a fork."""
    if queue is not None:
        torch.set_num_threads(1)
        from bnlab.kernels import cpu_cbn, cpu_fused

        swapped = not cpu_fused.forward_cfirst.targetoptions.get("parallel") and not (
            cpu_cbn.pooled_forward.targetoptions.get("parallel"))
    generator = torch.Generator().manual_seed(0)
    results = []
    for channels_last in (False, True):
        layer = bnlab.BatchNormAct2d(64)
        x = torch.randn(8, 64, 16, 16, generator=generator)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        x.requires_grad_()
        y = layer(x)
        y.square().sum().backward()
        results += [y.detach(), x.grad, layer.running_var]
    torch.manual_seed(0)
    net = bnlab.cross_iteration(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
                                                    torch.nn.ReLU(), torch.nn.Flatten(),
                                                    torch.nn.Linear(8 * 16, 4, bias=False), torch.nn.BatchNorm1d(4)),
                                window=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        optimizer.zero_grad()
        net(torch.randn(4, 3, 6, 6, generator=generator)).square().mean().backward()
        optimizer.step()
    results += list(net.state_dict().values())
    if queue is None:
        return results
    queue.put((swapped, [t.detach().numpy().copy() for t in results]))  # (NumPy: torch's tensors cross by fd)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork (POSIX)")
def test_a_forked_child_trains_on_the_kernels_as_its_parent():
    """multiprocessing's fork (Linux's default: Hogwild training, evaluation pools) after the
    parent ran the parallel kernels: numba's OpenMP layer used to kill the child at its first
    parallel loop ("fork() called from a process already using GNU OpenMP"), even with
    torch.set_num_threads(1). The child now runs the kernels' serial twins and computes what the
    parent computes."""
    import numba

    expected = _train_on_the_kernels()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_train_on_the_kernels, args=(queue,))
    child.start()
    deadline = time.monotonic() + 240  # (the twins compile in the child: seconds)
    try:
        while True:
            try:
                swapped, results = queue.get(timeout=1)
                break
            except queue_module.Empty:
                if not child.is_alive() or time.monotonic() > deadline:
                    pytest.fail(f"the forked child ended (exit code {child.exitcode}) or hung without results")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert swapped == (numba.threading_layer() == "omp")  # (TBB and workqueue are fork-safe: no twins)
    for ours, theirs in zip(results, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(ours), theirs.detach(), rtol=1e-5, atol=1e-6)
