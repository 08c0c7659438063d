"""Models with bnlab's layers train under torch.compile and match eager training step by step;
cross-iteration BN trains under torch.autocast and in a model converted to bfloat16 or float16 (the
other layers' low precision is tested with them).

The layers built on numba kernels (the fused BN + activation, cross-iteration BN) and Batch Renorm
(whose moving statistics change in place after the graph used them) run eagerly inside a compiled
model (graph breaks); before, dynamo failed inside numba's dispatcher and Batch Renorm's backward
failed autograd's version check. The "aot_eager" backend exercises dynamo and AOTAutograd (where
both failures were) without inductor's slow code generation.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import bnlab
from conftest import conv_net


CASES = {
    "bn": lambda: conv_net(bnlab.BatchNorm2d(8)),
    "bn-act-fused": lambda: conv_net(bnlab.BatchNormAct2d(64), 64),  # (8x64x32x32: the numba kernels)
    "batch-renorm": lambda: conv_net(bnlab.BatchRenorm2d(8, warmup=0, r_max_steps=1, d_max_steps=1)),
    "ghost": lambda: conv_net(bnlab.GhostBatchNorm2d(8, virtual_batch_size=2)),
    "cross-iteration": lambda: bnlab.cross_iteration(conv_net(nn.BatchNorm2d(8)), window=3),
}


@pytest.mark.parametrize("name", CASES)
def test_compiled_training_matches_eager(name):
    torch.manual_seed(0)
    eager, compiled = CASES[name](), CASES[name]()
    compiled.load_state_dict(eager.state_dict())
    if name == "cross-iteration":  # (pair() is not state: the copy pairs with its own convs)
        assert compiled[1].producer is compiled[0]
    step = torch.compile(compiled, backend="aot_eager")
    for _ in range(4):
        x = torch.randn(8, 3, 32, 32)
        y_eager, y_compiled = eager(x), step(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
        y_eager.square().mean().backward()
        y_compiled.square().mean().backward()
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-4, atol=1e-6)
    for key, value in eager.state_dict().items():  # running statistics, CBN's window, counters
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("producer", ["conv", "linear"])
def test_cross_iteration_bn_trains_under_autocast_close_to_float32(producer):
    """Under torch.autocast the producer's output is bfloat16 while its input and weight stay
    float32: the layer takes its statistics, window and derivatives in float32 (as BN does for
    low precision) and returns bfloat16. Before, the conv's d nu/dW mixed the dtypes and oneDNN
    refused it."""
    def make():
        torch.manual_seed(0)
        body = (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)) if producer == "conv" else \
            (nn.Linear(5, 8), nn.BatchNorm1d(8))
        return bnlab.cross_iteration(nn.Sequential(*body, nn.ReLU()), window=3)

    full, mixed = make(), make()
    shape = (8, 3, 12, 12) if producer == "conv" else (8, 5)
    for step in range(5):  # (two window entries filled, then pooled and compensated)
        x = torch.randn(shape)
        y_full = full(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_mixed = mixed(x)
        assert y_mixed.dtype == torch.bfloat16
        torch.testing.assert_close(y_mixed.float(), y_full, rtol=0.05, atol=0.05)
        for net, y in ((full, y_full), (mixed, y_mixed)):
            y.float().square().mean().backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.01 * p.grad
                    p.grad = None
    torch.testing.assert_close(mixed[1].running_var, full[1].running_var, rtol=0.02, atol=0.01)
    assert mixed[1].window_valid.all() and torch.isfinite(mixed[1].window_dnu).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("producer", ["conv", "linear"])
@pytest.mark.parametrize("kept", ["nothing", "the layer"], ids=["model.to(dtype)", "layer kept float32"])
def test_cross_iteration_bn_in_a_model_converted_to_low_precision(dtype, producer, kept):
    """``model.to(torch.bfloat16)`` (or ``.half()``): the layer's parameters, running statistics and
    producer are low precision, or the layer alone is kept float32 after a low-precision producer.
    Its statistics and derivatives are float32 all the same, and the window's per-channel
    statistics float64 (the window stays so through the conversion: the compensation cancels in 8
    bits), close to a float32 model's.
    Before, the first case failed in torch's kernel (mixed dtypes), the second in the compensation."""
    def make():
        torch.manual_seed(0)
        body = (nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)) if producer == "conv" else (nn.Linear(5, 8), nn.BatchNorm1d(8))
        return bnlab.cross_iteration(nn.Sequential(*body, nn.ReLU()), window=3)

    full, low = make(), make().to(dtype)
    if kept == "the layer":
        low[1].float()
    assert low[1].window_dnu.dtype == torch.float32 and low[1].window_mu.dtype == torch.float64
    shape = (8, 3, 12, 12) if producer == "conv" else (8, 5)
    opt = torch.optim.SGD(full.parameters(), lr=0.05)
    for step in range(5):  # (two window entries filled, then pooled and compensated)
        with torch.no_grad():  # the float32 model's weights, rounded: the same steps for the compensation
            for p, q in zip(low.parameters(), full.parameters()):
                p.copy_(q)
        x = torch.randn(shape).to(dtype)
        y_full, y_low = full(x.float()), low(x)
        assert y_low.dtype == dtype
        torch.testing.assert_close(y_low.float(), y_full, rtol=0.05, atol=0.05)
        opt.zero_grad()
        (y_full * torch.linspace(-1, 1, y_full.numel()).view(y_full.shape)).sum().backward()
        opt.step()
        y_low.float().sum().backward()  # (its own backward runs too)
        assert all(p.grad.dtype == p.dtype and torch.isfinite(p.grad).all() for p in low.parameters())
    torch.testing.assert_close(low[1].running_var.float(), full[1].running_var, rtol=0.03, atol=0.01)
    torch.testing.assert_close(low[1].window_nu, full[1].window_nu, rtol=0.03, atol=0.01)
    assert int(low[1].iteration) == 5 and low[1].window_valid.all()
    with bnlab.evaluating(low):
        assert low(x).dtype == dtype


EXPORTED = {
    "bn": lambda: conv_net(bnlab.BatchNorm2d(8)),
    "bn-act": lambda: conv_net(bnlab.BatchNormAct2d(8, act="leaky_relu")),
    "ghost": lambda: conv_net(bnlab.GhostBatchNorm2d(8, virtual_batch_size=2)),
    "batch-renorm": lambda: conv_net(bnlab.BatchRenorm2d(8, warmup=0, r_max_steps=1, d_max_steps=1)),
    "sync": lambda: conv_net(bnlab.SyncBatchNorm(8)),
    "cross-iteration": lambda: bnlab.cross_iteration(conv_net(nn.BatchNorm2d(8)), window=3),
}


@pytest.mark.parametrize("name", EXPORTED)
def test_every_layer_exports_for_inference(name):
    """Deployment: a trained model in eval mode goes through torch.export (a batch dimension of any
    size) with its running statistics, and gives eager's outputs. (torch.jit.script does not
    compile bnlab's layers, whose input checks are Python; torch 2.13 deprecates TorchScript.)"""
    torch.manual_seed(0)
    model = EXPORTED[name]()
    for _ in range(4):  # (running statistics away from their initial values)
        model(torch.randn(4, 3, 8, 8) * 2 + 1).square().mean().backward()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    for batch in (x, torch.randn(5, 3, 8, 8), torch.randn(1, 3, 8, 8)):
        torch.testing.assert_close(exported(batch), model(batch))


@pytest.mark.parametrize("name", EXPORTED)
def test_scripting_names_the_layer_and_the_way_out(name):
    """torch.jit.script of a model with a bnlab layer raises an error that names the layer and
    says what to use (it was TorchScript's "import statements aren't supported" at a line of
    torch.fx); the way it names, bnlab.to_torch then script, gives the model's inference."""
    torch.manual_seed(0)
    model = EXPORTED[name]()
    model(torch.randn(4, 3, 8, 8) * 2 + 1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (TorchScript's deprecation)
        with pytest.raises(TypeError, match=rf"cannot compile {type(model[1]).__name__}.*to_torch") as raised:
            torch.jit.script(model)
        if name == "sync":  # (torch's SyncBatchNorm, which to_torch gives, does not script: the error says so)
            assert "SyncBatchNorm, which TorchScript does not compile either" in str(raised.value)
            return
        scripted = torch.jit.script(bnlab.to_torch(copy.deepcopy(model)))
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(scripted(x), model(x))


GUARDED = {
    "bn": lambda: bnlab.BatchNorm2d(8),
    "bn on bnlab's autograd function": lambda: bnlab.BatchNorm2d(8, backend="autograd"),
    "ghost": lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=4),
    # momentum=None: the weight 1/t comes from the count as a tensor (it broke the graph before)
    "bn, cumulative average": lambda: bnlab.BatchNorm2d(8, momentum=None),
    "bn on bnlab's autograd function, cumulative average": lambda: bnlab.BatchNorm2d(8, momentum=None,
                                                                                     backend="autograd"),
    "ghost, cumulative average": lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=4, momentum=None),
}


@pytest.mark.parametrize("name", GUARDED)
def test_the_running_statistics_guard_compiles_into_one_graph(name):
    """The guard against non-finite batches, traced by torch.compile, is a choice between tensors
    instead of a branch on a value read on the host: no graph break at each layer (there was one
    or two), and a NaN batch still leaves the buffers as they were and is not counted."""
    import torch._dynamo

    torch.manual_seed(0)
    eager, compiled = conv_net(GUARDED[name]()), conv_net(GUARDED[name]())
    compiled.load_state_dict(eager.state_dict())
    assert torch._dynamo.explain(compiled)(torch.randn(8, 3, 6, 6)).graph_break_count == 0
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, backend="aot_eager")
    for i in range(3):
        x = torch.randn(8, 3, 6, 6)
        if i == 1:
            x[2, 1, 0, 0] = float("nan")
            before = {k: v.clone() for k, v in compiled[1].state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (eager warns; compiled cannot)
            y_eager, y_compiled = eager(x), step(x)
        y_eager.sum().backward()
        y_compiled.sum().backward()
        if i == 1:
            for key, value in compiled[1].state_dict().items():
                assert torch.equal(value, before[key]), key
    assert int(compiled[1].num_batches_tracked) == 2
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
