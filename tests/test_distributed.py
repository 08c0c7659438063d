"""Synchronized BN: two gloo processes on the CPU equal BN over the whole batch."""

import gc
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils.checkpoint

import bnlab
from bnlab.distributed import SyncBatchNormFunction

SHAPE = (8, 3, 4, 5)


def whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 3 + 2
    dy = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x, dy


def worker(rank, world, store, split, out, source="bnlab"):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, dy = whole_batch()
    start, stop = (0, split) if rank == 0 else (split, SHAPE[0])
    if source == "torch":  # a model built with torch's SyncBatchNorm, which refuses CPU tensors here
        layer = bnlab.convert(torch.nn.SyncBatchNorm(SHAPE[1], dtype=torch.float64, momentum=0.3))
    else:
        layer = bnlab.SyncBatchNorm(SHAPE[1], dtype=torch.float64, momentum=0.3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))
    results = {}
    for step in range(2):
        xs = (x[start:stop] * (step + 1)).clone().requires_grad_()
        if source == "checkpointed":  # recomputed in the backward (reentrant: the whole forward), no second fold
            y = torch.utils.checkpoint.checkpoint(layer, xs, use_reentrant=True)
        else:
            y = layer(xs)
        y.backward(dy[start:stop])
        results[f"y{step}"], results[f"dx{step}"] = y.detach().numpy(), xs.grad.numpy()
    results["dw"], results["db"] = layer.weight.grad.numpy(), layer.bias.grad.numpy()
    results["rm"], results["rv"] = layer.running_mean.numpy(), layer.running_var.numpy()
    np.savez(os.path.join(out, f"rank{rank}.npz"), **results)
    dist.destroy_process_group()


@pytest.mark.parametrize("split, source", [(5, "bnlab"), (8, "bnlab"), (3, "torch"), (5, "checkpointed")],
                         ids=["uneven", "empty-rank", "converted-from-torch", "activation-checkpointing"])
def test_two_gloo_processes_equal_whole_batch_bn(split, source, tmp_path):
    store = tmp_path / "store"
    mp.spawn(worker, args=(2, str(store), split, str(tmp_path), source), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    x, dy = whole_batch()
    reference = torch.nn.BatchNorm2d(SHAPE[1], dtype=torch.float64, momentum=0.3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64))
    for step in range(2):
        xs = (x * (step + 1)).clone().requires_grad_()
        y = reference(xs)
        y.backward(dy)
        np.testing.assert_allclose(np.concatenate([r[f"y{step}"] for r in ranks]), y.detach().numpy(), rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[f"dx{step}"] for r in ranks]), xs.grad.numpy(), rtol=1e-9,
                                   atol=1e-12)
    # Each rank's dgamma/dbeta is its own part; their sum is the whole batch's (what DDP all-reduces).
    np.testing.assert_allclose(ranks[0]["dw"] + ranks[1]["dw"], reference.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(ranks[0]["db"] + ranks[1]["db"], reference.bias.grad.numpy(), rtol=1e-9)
    for r in ranks:
        np.testing.assert_allclose(r["rm"], reference.running_mean.numpy(), rtol=1e-10)
        np.testing.assert_allclose(r["rv"], reference.running_var.numpy(), rtol=1e-10)


def test_without_a_process_group_it_is_local_bn_and_gradchecks():
    x, _ = whole_batch()
    layer = bnlab.SyncBatchNorm(3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.nn.functional.batch_norm(x, None, None, layer.weight, layer.bias,
                                                                         True))
    xs = x[:3, :, :2, :2].clone().requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: SyncBatchNormFunction.apply(x, w, b, 1e-5, None)[0], (xs, w, b))


def test_without_a_process_group_a_gradient_of_the_gradient_gradchecks():
    x, _ = whole_batch()
    xs = x[:3, :, :2, :2].clone().requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: SyncBatchNormFunction.apply(x, w, b, 1e-5, None)[0],
                                        (xs, w, b))


def penalty_worker(rank, world, store, split, out):
    """A gradient penalty through SyncBN on this rank's part of the batch: the gradient of
    sum(y * c) over the whole batch with respect to this rank's inputs, squared and summed, then
    differentiated again."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, c = whole_batch()
    start, stop = (0, split) if rank == 0 else (split, SHAPE[0])
    layer = bnlab.SyncBatchNorm(SHAPE[1], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    xs = x[start:stop].clone().requires_grad_()
    (g,) = torch.autograd.grad((layer(xs) * c[start:stop]).sum(), xs, create_graph=True)
    g.square().sum().backward()
    assert layer.bias.grad is None  # (the input gradient does not depend on beta)
    np.savez(os.path.join(out, f"rank{rank}.npz"), g=g.detach().numpy(), dx=xs.grad.numpy(),
             dw=layer.weight.grad.numpy())
    dist.destroy_process_group()


@pytest.mark.parametrize("split", [5, 8], ids=["uneven", "empty-rank"])
def test_a_gradient_penalty_over_two_gloo_processes_equals_whole_batch_bn(split, tmp_path):
    """Under create_graph=True the synchronized backward is a graph (two differentiable
    all-reduces), so a gradient penalty through SyncBN over two halves of a batch equals one
    through BN over the whole batch: the input gradients, their gradients, and the summed gamma
    gradients."""
    mp.spawn(penalty_worker, args=(2, str(tmp_path / "store"), split, str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    x, c = whole_batch()
    reference = torch.nn.BatchNorm2d(SHAPE[1], dtype=torch.float64)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    xs = x.clone().requires_grad_()
    (g,) = torch.autograd.grad((reference(xs) * c).sum(), xs, create_graph=True)
    g.square().sum().backward()
    for key, expected in (("g", g.detach()), ("dx", xs.grad)):
        np.testing.assert_allclose(np.concatenate([r[key] for r in ranks]), expected.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ranks[0]["dw"] + ranks[1]["dw"], reference.weight.grad.numpy(), rtol=1e-9,
                               atol=1e-12)
    assert np.abs(reference.weight.grad.numpy()).max() > 1e-3  # (the penalty depends on gamma)


def test_convert_swaps_plain_bn_layers_only():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), bnlab.BatchNorm1d(2),
                              bnlab.BatchRenorm1d(2), bnlab.GhostBatchNorm1d(2))
    net[1].running_mean.fill_(0.5)
    with pytest.warns(UserWarning, match=r"left as they were: '3' \(BatchRenorm1d\), '4' \(GhostBatchNorm1d\);"):
        converted = bnlab.SyncBatchNorm.convert(net)
    assert [type(m).__name__ for m in converted] == ["Conv2d", "SyncBatchNorm", "SyncBatchNorm", "BatchRenorm1d",
                                                     "GhostBatchNorm1d"]
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    import warnings

    with warnings.catch_warnings():  # nothing left, nothing said; converting again leaves nothing either
        warnings.simplefilter("error")
        plain = bnlab.SyncBatchNorm.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)))
        bnlab.SyncBatchNorm.convert(plain)


def test_torchs_converter_leaves_bnlabs_layers_unsynchronized():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm converts torch's BN classes only: bnlab's layers
    stay local, with no warning (the README says to use bnlab.SyncBatchNorm.convert, which takes both)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bnlab.BatchNorm2d(4), torch.nn.BatchNorm2d(4))
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert [type(m).__name__ for m in converted] == ["Conv2d", "BatchNorm2d", "SyncBatchNorm"]
    assert isinstance(converted[1], bnlab.BatchNorm2d)
    ours = bnlab.SyncBatchNorm.convert(net)  # (torch's SyncBatchNorm that torch's converter made too)
    assert [type(m) for m in ours][1:] == [bnlab.SyncBatchNorm, bnlab.SyncBatchNorm]


@pytest.mark.parametrize("convert", [bnlab.convert, bnlab.SyncBatchNorm.convert])
def test_torch_sync_batch_norm_becomes_bnlabs_with_its_group_state_and_frozen_parameters(convert):
    group = object()  # (a stand-in: the group is only carried over here)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.SyncBatchNorm(4, momentum=None, process_group=group))
    net[1].running_var.fill_(2.0)
    net[1].num_batches_tracked.fill_(7)
    net[1].weight.requires_grad_(False)
    converted = convert(net)[1]
    assert type(converted) is bnlab.SyncBatchNorm and converted.process_group is group
    assert bnlab.SyncBatchNorm.convert(bnlab.BatchNorm1d(4, momentum=0.3, stats="cumulative")).stats == "cumulative"
    assert converted.stats == "cumulative" and int(converted.num_batches_tracked) == 7
    assert torch.equal(converted.running_var, torch.full((4,), 2.0)) and not converted.weight.requires_grad


def data_parallel_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The copy nn.DataParallel makes of ``model`` for one GPU at each forward (torch.nn.parallel.replicate,
    which needs CUDA devices), on the CPU: every module's ``_replicate_for_data_parallel()``, which
    marks it ``_is_replica``, with its children relinked and the parameters referenced."""
    modules = list(model.modules())
    copies = {id(module): module._replicate_for_data_parallel() for module in modules}
    for module in modules:
        copy = copies[id(module)]
        copy._modules = {name: copies[id(child)] for name, child in module._modules.items()}
        copy._parameters = dict(module._parameters)
    return copies[id(model)]


@pytest.mark.parametrize("layer", ["sync", "cross-iteration"])
def test_data_parallel_copies_refuse_to_train_and_infer_as_the_model(layer):
    """(In nn.DataParallel's copies SyncBatchNorm normalized each copy's part of the batch alone, or
    hung a rank where a process group has several; cross-iteration BN said its producer had not
    run: the copy's producer runs the hook of the original layer.) Eval mode needs neither."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    net = bnlab.SyncBatchNorm.convert(net) if layer == "sync" else bnlab.cross_iteration(net, window=2)
    x = torch.randn(4, 3, 6, 6)
    net(x)
    copy = data_parallel_copy(net)
    with pytest.raises(RuntimeError, match=r"'1' cannot train inside nn.DataParallel: .* Use DistributedDataParallel"):
        copy(x)
    net.eval()
    assert torch.equal(data_parallel_copy(net)(x), net(x))


def test_one_value_over_the_whole_group_is_an_error():
    with pytest.raises(ValueError, match="1 value"):
        bnlab.SyncBatchNorm(3)(torch.randn(1, 3))


def eval_alone_worker(rank, world, store, out):
    import datetime

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))  # (a collective rank 1 never joins fails)
    if rank == 0:  # ("if rank == 0: evaluate(model)": the other rank makes no call)
        layer = bnlab.SyncBatchNorm(3, track_running_stats=False, dtype=torch.float64).eval()
        x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        np.save(os.path.join(out, "y.npy"), layer(x).detach().numpy())
    dist.destroy_process_group()


def test_eval_without_running_statistics_makes_no_collective(tmp_path):
    """(eval mode without running statistics synchronized the batch statistics over the group:
    a rank that evaluated alone waited for the others; torch's SyncBatchNorm takes the local batch)"""
    mp.spawn(eval_alone_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    x = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()(x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="track_running_stats=False.*more than one value"):
        bnlab.SyncBatchNorm(3, track_running_stats=False).eval()(torch.randn(1, 3))


def ddp_cbn_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # (the same initial weights on both ranks)
    net = bnlab.cross_iteration(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)),
                                window=3)
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # (broadcast_buffers=True, DDP's default)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own batches
    means = []
    for _ in range(4):
        u = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float32) * (rank + 1) + rank
        means.append(net[0](u).detach().mean((0, 2, 3)))  # this rank's own batch statistics
        ddp(u).square().mean().backward()
        opt.step()
        opt.zero_grad()
    np.savez(os.path.join(out, f"rank{rank}.npz"), window_mu=net[1].window_mu.numpy(),
             means=torch.stack(means).numpy(), weight=net[0].weight.detach().numpy())
    # DDP's reducer must go before the group: freed after it, its last reference to the group
    # destroys it while holding the GIL that gloo's thread waits for (a hang in torch's teardown).
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()


def test_under_ddp_each_rank_keeps_its_own_cross_iteration_window(tmp_path):
    """DDP broadcasts rank 0's buffers before every forward; a converted model tells it to leave
    the windows out. Before, rank 1 pooled rank 0's past statistics, and the window's derivatives
    crossed the network every step."""
    mp.spawn(ddp_cbn_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    np.testing.assert_array_equal(ranks[0]["weight"], ranks[1]["weight"])  # DDP trained one model
    for r in ranks:  # iterations 2 and 3 wrote slots 0 and 1 (window 3: two past entries)
        np.testing.assert_allclose(r["window_mu"][0], r["means"][2], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["window_mu"][1], r["means"][3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ranks[0]["window_mu"], ranks[1]["window_mu"])
