"""Functions over a whole model: inference without touching its modes, population statistics
(Algorithm 2), the converters from and to torch.nn, and folding batch-norm layers into their producers for inference."""

from __future__ import annotations

import collections
import contextlib
import copy
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from bnlab import functional as F
from bnlab.modules.batch import (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct, _caller_level,
                                 carry_state, forward_arguments, is_batch_norm, name_layers, trace_graph, warn_left)
from bnlab.modules.cross_iter import CrossIterationBatchNorm
from bnlab.modules.renorm import BatchRenorm


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Inference inside a training run: every module of ``model`` in eval mode and no autograd
    graph inside the block, and afterwards each module back in the mode it had, after an error too.

    In eval mode BN normalizes with its running statistics (Algorithm 2) and leaves them alone;
    in training mode it would normalize each test batch by its own statistics and fold the test
    data into the running averages. The usual ``model.eval(); ...; model.train()`` has two
    traps: an error or an early return skips the second call, and the next steps train with
    frozen statistics and no dropout; and ``model.train()`` also switches on the modules that
    were in eval mode on purpose, such as the frozen BN layers of a fine-tuned backbone.

    Example:
        >>> import bnlab
        >>> net = nn.Sequential(nn.Linear(4, 8), bnlab.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
        >>> x_test, y_test = torch.randn(16, 4), torch.randint(0, 2, (16,))
        >>> with bnlab.evaluating(net):
        ...     accuracy = (net(x_test).argmax(1) == y_test).float().mean()
        >>> net.training, net[1].num_batches_tracked.item()   # back in training mode, nothing folded in
        (True, 0)
    """
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        _restore(modes)


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    """Each module's own flag, as it was (``train(mode)`` would set its children's too)."""
    for module, mode in modes:
        module.training = mode


def population_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose running statistics :func:`recalibrate` recomputes: batch norms
    (bnlab's or torch's) that keep a running mean and variance."""
    return [m for m in model.modules()
            if is_batch_norm(m) and m.track_running_stats and getattr(m, "running_var", None) is not None]


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, forward=None) -> nn.Module:
    """Ioffe & Szegedy 2015, Algorithm 2: population statistics for every BN layer of ``model``.

    Runs the batches through the training-mode network without autograd (every BN layer
    normalizing with its batch statistics, cross-iteration BN too, whose window and iteration count
    are left alone; every other module in eval mode, so dropout is off) and sets each layer's
    running statistics to

        E[x] = mean over batches of mu_B,   Var[x] = mean over batches of m/(m-1) * sigma2_B,

    where m is the number of values per channel in that batch (the paper's m/(m-1) E_B[sigma2_B]
    when every batch has the same size). Parameters, ``num_batches_tracked``, train/eval modes and
    all other state are left as they were. Batch Renorm keeps its moving mean and standard
    deviation: its training already normalizes towards them (r and d), so they are what its
    inference should use (the paper's point); Group Norm has no statistics to recompute. A batch
    that reaches a layer with NaN or inf values is left out of that layer's statistics, as in
    training, and a warning counts them; if every batch was, nothing changes and an error says so.

    It is what ``torch.optim.swa_utils.update_bn`` does for torch's BN layers; that function finds
    torch's classes only and returns at once on bnlab's, so after SWA or EMA averaging
    (``AveragedModel``) recalibrate the averaged model with this one.

    Args:
        model: a module holding bnlab or torch.nn batch-norm layers.
        batches: an iterable of inputs; a tuple or list is taken as ``(input, ...)``.
        forward: optional ``forward(model, batch)``; by default ``model(batch[0] or batch)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), BatchNorm1d(8))
        >>> train_loader = [(torch.randn(32, 4) * 3 + 1, None) for _ in range(50)]
        >>> net = recalibrate(net, (x for x, _ in train_loader))    # (a DataLoader, in practice)
        >>> net[1].running_mean.shape, net[1].num_batches_tracked.item()   # (the count left as it was)
        (torch.Size([8]), 0)
    """
    layers = population_layers(model)
    if not layers:  # (not an error: a pipeline may recalibrate any model; but no batch is run for nothing)
        warnings.warn(f"recalibrate: {type(model).__name__} has no batch-norm layer with running statistics (Batch "
                      "Renorm's moving averages, Group Norm and track_running_stats=False keep none to recompute); "
                      "nothing to do, no batch was run", stacklevel=2)
        return model
    modes = _modes(model)
    saved = {
        layer: (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        for layer in layers
    }
    sums = {layer: [0.0, 0.0, 0] for layer in layers}
    skipped = {layer: 0 for layer in layers}

    def record(layer, args):
        x = args[0].detach().double()
        mean, var_biased = F.batch_stats(x)
        m = F.values_per_channel(x)
        if m < 2:
            raise ValueError(f"recalibrate: a batch has {m} value(s) per channel; Algorithm 2 needs m >= 2")
        if not bool(torch.isfinite(mean).all() and torch.isfinite(var_biased).all()):
            skipped[layer] += 1  # (as in training: a NaN or inf batch never enters the statistics)
            return
        acc = sums[layer]
        acc[0] = acc[0] + mean
        acc[1] = acc[1] + var_biased * (m / (m - 1))
        acc[2] += 1

    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    pooled = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm)]
    try:
        model.eval()
        for layer in layers:
            layer.train()
        for layer in pooled:  # batch statistics, as Algorithm 2 has them; the window stays as it is
            layer.__dict__["_batch_statistics"] = True
        with torch.no_grad():  # (statistics only: no autograd graph to build and free for each batch)
            for batch in batches:
                if forward is not None:
                    forward(model, batch)
                else:
                    model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
        for layer in pooled:
            layer.__dict__["_batch_statistics"] = False
        _restore(modes)
        for layer, (mean, var, count) in saved.items():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(count)
    names = {layer: name or type(layer).__name__ for name, layer in model.named_modules() if layer in sums}
    for layer, (_, _, n) in sums.items():  # (every check before any layer changes)
        if n == 0 and skipped[layer]:
            raise ValueError(f"recalibrate: every batch ({skipped[layer]}) reached {names[layer]!r} with NaN or inf "
                             "values; the model's running statistics are left as they were")
        if n == 0:
            raise ValueError("recalibrate: no batch reached a batch-norm layer; pass at least one batch")
        if skipped[layer]:
            warnings.warn(f"recalibrate: {skipped[layer]} of {n + skipped[layer]} batches reached {names[layer]!r} "
                          "with NaN or inf values and were left out of its population statistics", stacklevel=2)
    for layer, (sum_mean, sum_var, n) in sums.items():
        layer.running_mean.copy_(sum_mean / n)
        layer.running_var.copy_(sum_var / n)
    return model


TORCH_TO_BNLAB = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert(model: nn.Module, **kwargs) -> nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` for bnlab's, keeping its state
    (``torch.nn.SyncBatchNorm`` for :class:`bnlab.SyncBatchNorm`, with its process group).

    Parameters, buffers, device, dtype, requires_grad and train/eval mode carry over; ``kwargs``
    (``stats=``, ``backend=``) go to the new layers. Returns the model (a new layer when ``model``
    itself is a batch-norm layer). Other torch batch-norm layers (subclasses with their own
    forward, an uninitialized ``LazyBatchNorm``) are left as they are, and a warning names them.

    Example (``convert(torchvision.models.resnet18())`` for a whole network):
        >>> net = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=None)))
        >>> type(net[1]).__module__, net[1].stats
        ('bnlab.modules.batch', 'cumulative')
    """
    model = name_layers(_swap_tree(model, lambda module: _converted(module, kwargs)))
    warn_left(model, lambda m: isinstance(m, BatchNorm), "convert",
              "only torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm themselves become bnlab's (a lazy layer after "
              "its first forward)")
    return model


def _converted(module: nn.Module, kwargs) -> nn.Module | None:
    cls = TORCH_TO_BNLAB.get(type(module))
    if type(module) is nn.SyncBatchNorm:  # bnlab's runs on any backend, gloo on the CPU included
        from bnlab.distributed import SyncBatchNorm

        cls, kwargs = SyncBatchNorm, {"process_group": module.process_group, **kwargs}
    if cls is None:
        return None
    ref = module.weight if module.affine else module.running_mean
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.running_mean is not None,  # (carry_state sets the flag itself)
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **kwargs,
    )
    return carry_state(module, new)


TORCH_BY_RANKS = {(2, 3): nn.BatchNorm1d, (2,): nn.BatchNorm1d, (4,): nn.BatchNorm2d, (5,): nn.BatchNorm3d}


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: every bnlab batch-norm layer of ``model`` swapped for
    torch.nn's, with the same outputs in eval mode, for a deployment without bnlab installed.

    Each layer becomes ``torch.nn.BatchNorm1d/2d/3d`` (by the ranks it takes;
    :class:`bnlab.SyncBatchNorm` becomes ``torch.nn.SyncBatchNorm``, process group kept, which
    evaluates anywhere but trains synchronized on GPUs only) with its
    parameters (themselves: an optimizer made before still steps them), running statistics,
    batch count, eps, momentum (``stats="cumulative"``: ``momentum=None``, the same average),
    device, dtype, requires_grad and mode.
    :class:`bnlab.BatchNormAct` becomes ``nn.Sequential(BatchNorm, activation)`` (its state_dict
    keys gain ``.0``). The layers whose training differs from BN's keep their inference:

    - Batch Renorm's y = gamma (x - mu) / sigma + beta is BN's with running_var = sigma^2 - eps;
    - ghost and cross-iteration BN normalize with the running statistics as BN does; the
      window and the producer's hook are dropped;
    - a gamma pruned by ``torch.nn.utils.prune`` goes over as its pruned values, the mask
      dropped (torch.nn alone loads the state_dict; :func:`convert` keeps the mask).

    After it the model trains as plain BN (torch's). Left as they are, named in a warning: the
    layers of a base class that takes any rank (``bnlab.BatchNorm`` itself: no torch.nn class
    checks that; use its 1d/2d/3d).

    Returns the model (a new layer when ``model`` itself is one).

    Example:
        >>> import bnlab
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchRenorm2d(8), nn.ReLU())
        >>> _ = net(torch.randn(4, 3, 6, 6))
        >>> plain = bnlab.to_torch(net)
        >>> type(plain[1]).__module__, sorted(plain[1].state_dict())
        ('torch.nn.modules.batchnorm', ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight'])
    """
    model = _swap_tree(model, _to_torch)
    warn_left(model, lambda m: not isinstance(m, BatchNorm), "to_torch",
              "a base class that takes any rank has no torch.nn twin (use its 1d/2d/3d)")
    return model


def _swap_tree(module: nn.Module, swapped) -> nn.Module:
    """``module`` with each module in its tree replaced by ``swapped(module)`` where that is not None."""
    new = swapped(module)
    if new is not None:
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_tree(child, swapped))
    return module


def _to_torch(layer: nn.Module) -> nn.Module | None:
    from bnlab.distributed import SyncBatchNorm

    if not isinstance(layer, BatchNorm):
        return None
    if isinstance(layer, SyncBatchNorm):
        cls, extra = nn.SyncBatchNorm, {"process_group": layer.process_group}
    else:
        cls, extra = TORCH_BY_RANKS.get(tuple(layer.ranks)), {}
    if cls is None:
        return None
    ref = layer.weight if layer.affine else layer.running_mean
    new = cls(layer.num_features, eps=layer.eps, momentum=None if layer.stats == "cumulative" else layer.momentum,
              affine=layer.affine, track_running_stats=layer.running_mean is not None,
              device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None, **extra)
    with torch.no_grad():
        for name in ("weight", "bias") if layer.affine else ():
            own = layer._parameters.get(name)
            if own is not None:  # (the parameter itself: an optimizer made before still steps it)
                new._parameters[name] = own
            else:  # (computed: pruned or parametrized; its values)
                getattr(new, name).copy_(getattr(layer, name))
                getattr(new, name).requires_grad_(getattr(layer, name).requires_grad)
        if layer.running_mean is not None:
            new.running_mean.copy_(layer.running_mean)
            if isinstance(layer, BatchRenorm):  # sigma = sqrt(running_var + eps)
                var = layer.running_std.double().square() - layer.eps
                if bool((var < -1e-3 * layer.eps).any()):  # (sigma below sqrt(eps): no variance gives it)
                    warnings.warn(f"to_torch: {layer._label()} has sigma below sqrt(eps) in channels "
                                  f"{(var < -1e-3 * layer.eps).nonzero().flatten().tolist()}; torch's BN there "
                                  "normalizes by sqrt(eps), so its outputs differ", stacklevel=_caller_level())
                new.running_var.copy_(var.clamp_min(0))
            else:
                new.running_var.copy_(layer.running_var)
            new.num_batches_tracked.copy_(layer.num_batches_tracked)
    if isinstance(layer, CrossIterationBatchNorm):
        layer._unhook()
    new.track_running_stats = layer.track_running_stats  # (False after construction: the buffers are kept)
    new.train(layer.training)
    if isinstance(layer, BatchNormAct):
        return nn.Sequential(new, ACTIVATION_MODULES[layer.act](layer.negative_slope)).train(layer.training)
    return new


# What each bnlab layer's eval mode is: Algorithm 2 (BN, ghost, synchronized and cross-iteration
# BN), then an activation (BatchNormAct), or Batch Renorm's sigma
INFERENCE_AFFINE = (BatchNorm._inference, BatchNormAct._inference, BatchRenorm._inference)
FUSED_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d)
ACTIVATION_MODULES = {  # BatchNormAct's act -> the module that stays in its place, given the slope
    "identity": lambda slope: nn.Identity(), "relu": lambda slope: nn.ReLU(), "leaky_relu": nn.LeakyReLU,
    "silu": lambda slope: nn.SiLU(), "sigmoid": lambda slope: nn.Sigmoid()}


def fuse(model: nn.Module, example_inputs=None, inplace: bool = False) -> nn.Module:
    """The model for inference with each batch-norm layer folded into the Linear or Conv that
    produces its input: one layer fewer a pair, the same outputs up to rounding.

    In eval mode a batch-norm layer is a per-channel affine map (Algorithm 2, line 11):
    y = s (x - E[x]) + beta with s = gamma / sqrt(Var[x] + eps) (Batch Renorm: gamma / sigma, its
    eps inside sigma). After x = W u + b it folds into the producer:

        W'_j = s_j W_j,    b'_j = s_j (b_j - E[x]_j) + beta_j.

    The layer is replaced by ``nn.Identity`` (:class:`bnlab.BatchNormAct`'s by its activation).
    The pairs come from the model's torch.fx graph (bnlab's and torch.nn's batch-norm layers;
    Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d producers: a decoder's or a GAN generator's
    upsampling). A layer is left as it is, and a warning names it with the reason, where folding
    would change another result or is not a fixed affine map: its input is not a producer's
    output, or that output is also used elsewhere, or the producer or the layer runs more than
    once, or the producer's weight is shared or computed (a parametrization, or the forward hook
    of torch.nn.utils.prune, weight_norm or spectral_norm), or the layer keeps no running
    statistics. A Linear's pair is folded only where its output is ``(N, C)`` for sure
    (batch-norm normalizes dimension 1, a Linear's features are the last): its input flattened
    from dimension 1 (a CNN's head), or ``example_inputs`` showing the shape.

    Args:
        model: any module torch.fx can trace (for one it cannot, fuse a part: ``model.backbone``).
        example_inputs: the forward's arguments for one pass without gradients (a tensor, or a
            tuple of them, as :func:`bnlab.cross_iteration` takes them): the shapes, and a
            check that the fused model gives the model's outputs (ValueError otherwise).
        inplace: fold into ``model`` itself (a failed check, or any error on the way, undoes the
            folds and the switch to eval mode); by default a deep copy is fused and ``model`` is left
            as it was.

    Returns:
        The fused model, in eval mode.

    Example:
        >>> import bnlab
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), bnlab.BatchNormAct2d(8, act="relu"), nn.Flatten(),
        ...                     nn.Linear(8 * 4 * 4, 10), bnlab.BatchNorm1d(10))
        >>> _ = net(torch.randn(16, 3, 6, 6))                     # training: running statistics
        >>> fused = bnlab.fuse(net, example_inputs=(torch.randn(2, 3, 6, 6),))
        >>> [type(m).__name__ for m in fused]
        ['Conv2d', 'ReLU', 'Flatten', 'Linear', 'Identity']
    """
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as err:  # (torch's, for a weight that a forward hook computed with a graph)
            raise ValueError(f"fuse: cannot copy the model ({err}). A weight set by a forward hook (torch.nn.utils."
                             "prune, or the older weight_norm or spectral_norm) holds the graph of the last forward: "
                             "run one under torch.no_grad() first, or pass inplace=True") from err
    try:
        graph = trace_graph(model)
    except Exception as err:  # fx raises many kinds
        raise ValueError(f"fuse: could not trace the model with torch.fx ({err}); fuse a part that it can trace "
                         "(a detector's backbone: fuse(model.backbone, inplace=True))") from err
    modes, folded = _modes(model), []  # folded: (name, layer, producer, its weight and bias before), to undo
    try:
        model.eval()  # (before the example's forward: in training mode it would fold the example in)
        expected, shapes = None, {}
        if example_inputs is not None:
            example_inputs = forward_arguments(example_inputs)
            expected, shapes = _example_pass(model, graph, example_inputs)
        left = _fold_pairs(model, graph, shapes, folded)
        if expected is not None:
            with torch.no_grad():
                _check_fused(model(*example_inputs), expected)
    except BaseException:
        if inplace:  # (a copy is dropped anyway)
            _unfold(model, folded)
            _restore(modes)
        raise
    for _, norm, *_ in folded:
        if isinstance(norm, CrossIterationBatchNorm):
            norm._unhook()
    if left:
        warnings.warn("fuse: left as they were: " + "; ".join(f"{name!r}: {why}" for name, why in left.items()),
                      stacklevel=2)
    return model


@torch.no_grad()
def _example_pass(model: nn.Module, graph, example_inputs: tuple):
    """The model's outputs on ``example_inputs`` and the shape of each graph node's value."""
    from torch.fx.passes.shape_prop import ShapeProp

    expected = model(*example_inputs)
    ShapeProp(torch.fx.GraphModule(model, graph)).propagate(*example_inputs)
    shapes = {node: node.meta["tensor_meta"].shape for node in graph.nodes
              if hasattr(node.meta.get("tensor_meta"), "shape")}
    return expected, shapes


def _fold_pairs(model: nn.Module, graph, shapes: dict, folded: list) -> dict[str, str]:
    """Fold each batch-norm layer of ``graph`` that can be into its producer, appending to
    ``folded`` what :func:`_unfold` needs; returns the layers left, with the reasons."""
    modules = dict(model.named_modules())
    calls = collections.Counter(node.target for node in graph.nodes if node.op == "call_module")
    owners = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    left = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_batch_norm(modules[node.target]):
            continue
        name, norm = node.target, modules[node.target]
        source = node.args[0] if node.args else None
        producer = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        reason = _unfusable(norm, calls[name], producer, source, calls, owners, shapes, modules)
        if reason:
            left[name] = reason
            continue
        bias = producer.bias.detach().clone() if producer.bias is not None else None
        folded.append((name, norm, producer, producer.weight.detach().clone(), bias))
        _fold_into(producer, *_inference_affine(norm))
        act = getattr(norm, "act", "identity")
        model.set_submodule(name, ACTIVATION_MODULES[act](getattr(norm, "negative_slope", 0.01)))
    return left


@torch.no_grad()
def _unfold(model: nn.Module, folded: list) -> None:
    """Undo :func:`fuse`'s folds: each producer's weight and bias as they were, each layer back in its place."""
    for name, norm, producer, weight, bias in reversed(folded):
        producer.weight.copy_(weight)
        if bias is None:
            producer.bias = None
        else:
            producer.bias.copy_(bias)
        model.set_submodule(name, norm)


def _unfusable(norm, norm_calls, producer, source, calls, owners, shapes, modules) -> str | None:
    """Why ``norm`` cannot be folded into ``producer`` (None when it can)."""
    if isinstance(norm, BatchNorm) and type(norm)._inference not in INFERENCE_AFFINE:
        return f"{type(norm).__name__} has its own inference"
    if not isinstance(norm, BatchNorm) and type(norm) not in TORCH_TO_BNLAB and type(norm) is not nn.SyncBatchNorm:
        return f"{type(norm).__name__} is not one of torch.nn's BatchNorm1d/2d/3d"
    if norm.running_mean is None:  # (track_running_stats set False after construction stops their updates only)
        return "it keeps no running statistics (track_running_stats=False): batch statistics in eval mode too"
    if norm_calls > 1:
        return "it runs more than once in a forward pass"
    if not isinstance(producer, FUSED_PRODUCERS):
        what = source.target if getattr(source, "op", None) == "call_module" else getattr(source, "op", "no input")
        return f"its input comes from {what!r}, not from a Linear or a Conv or ConvTranspose 1d/2d/3d"
    if calls[source.target] > 1:
        return f"its producer {source.target!r} runs more than once"
    if len(source.users) > 1:
        return f"its producer's output is also used elsewhere ({', '.join(str(u) for u in source.users)})"
    computed = F.computed_weight(producer)
    if computed:  # (a fold into it would not last: undone at the next read or forward)
        return (f"its producer's weight is {computed} (to fold it, make the weight plain first: "
                "torch.nn.utils.parametrize.remove_parametrizations, prune.remove, remove_weight_norm, "
                "remove_spectral_norm)")
    if any(owners[id(p)] > 1 for p in producer.parameters(recurse=False)):
        return "its producer shares a parameter with another layer"
    outputs = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if outputs != norm.num_features:
        return f"its producer has {outputs} outputs, the layer {norm.num_features} channels"
    if isinstance(producer, nn.Linear):
        if source in shapes and len(shapes[source]) != 2:
            return f"its Linear's output is {tuple(shapes[source])}, not (N, C)"
        if source not in shapes and not _flattened(source.args[0] if source.args else None, modules):
            return ("a Linear's output folds only as (N, C): its input is not flattened from dimension 1, and no "
                    "example_inputs showed its shape")
    return None


def _flattened(node, modules) -> bool:
    """Whether fx node ``node`` is (N, F) for sure: a flatten from dimension 1 to the last
    (``x.flatten(1)``, ``torch.flatten(x, 1)``, ``nn.Flatten()``), as in a CNN's head."""
    if getattr(node, "op", None) == "call_module":
        module = modules.get(node.target)
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    is_flatten = (getattr(node, "op", None) == "call_method" and node.target == "flatten") or (
        getattr(node, "op", None) == "call_function" and node.target is torch.flatten)
    if not is_flatten:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _inference_affine(norm) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode layer as y = scale * x + shift per channel, in float64."""
    mean = norm.running_mean.detach().double()
    if isinstance(norm, BatchRenorm):
        invstd = norm.running_std.detach().double().reciprocal()  # (eps is inside sigma)
    else:
        invstd = torch.rsqrt(norm.running_var.detach().double() + norm.eps)
    scale = invstd if norm.weight is None else invstd * norm.weight.detach().double()
    shift = -mean * scale if norm.bias is None else norm.bias.detach().double() - mean * scale
    return scale, shift


@torch.no_grad()
def _fold_into(producer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """W_j <- scale_j W_j, b_j <- scale_j b_j + shift_j (a bias made where there was none). Output
    channel j is the weight's row j, but for a transposed conv, whose weight is (C_in, C/G, *k)."""
    weight = producer.weight
    bias = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(scale)
    scale = scale.to(weight.device)
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        groups, kernel = producer.groups, weight.shape[2:]
        # (C_in, C/G, *k) -> (G, C_in/G, C/G, *k); scale (C,) -> (G, 1, C/G, 1, ...)
        grouped = weight.double().view(groups, -1, *weight.shape[1:])
        weight.copy_((grouped * scale.view(groups, 1, -1, *([1] * len(kernel)))).view(weight.shape))
    else:  # (C,) -> (C, 1, ...): one row of the weight per output channel
        weight.copy_(weight.double() * scale.view(-1, *([1] * (weight.dim() - 1))))
    new_bias = (bias * scale + shift).to(weight.dtype)
    if producer.bias is None:
        producer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        producer.bias.copy_(new_bias)


def _check_fused(outputs, expected) -> None:
    """ValueError unless the fused model's outputs are the model's, to rounding in their dtype."""
    got, want = torch.utils._pytree.tree_leaves(outputs), torch.utils._pytree.tree_leaves(expected)
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor) and b.is_floating_point():
            scale = b.nan_to_num(0.0, 0.0, 0.0).abs().max().item() if b.numel() else 0.0
            tol = 1e3 * torch.finfo(b.dtype).eps * max(scale, 1.0)
            if a.shape != b.shape:
                raise ValueError(f"fuse: the fused model's output has shape {tuple(a.shape)}, the model's "
                                 f"{tuple(b.shape)}; fuse the parts separately to find the layer")
            difference = (a - b).abs()
            if not bool(((difference <= tol) | (a.isnan() & b.isnan())).all()):
                raise ValueError(f"fuse: the fused model's output differs from the model's (largest difference "
                                 f"{difference.nan_to_num(float('inf')).max().item():.3g}, allowed {tol:.3g}): a "
                                 "folded layer's input was not what the graph said; fuse the parts separately to "
                                 "find it")
