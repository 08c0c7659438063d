"""Functions over a whole model: inference without touching its modes, population statistics
(Algorithm 2), and the torch.nn converter."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import torch
from torch import nn

from bnlab import functional as F
from bnlab.modules.batch import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, is_batch_norm, name_layers, warn_left
from bnlab.modules.cross_iter import CrossIterationBatchNorm


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

    Runs the batches through the training-mode network (every BN layer normalizing with its batch
    statistics, cross-iteration BN too, whose window and iteration count are left alone; every
    other module in eval mode, so dropout is off) and sets each layer's running statistics to

        E[x] = mean over batches of mu_B,   Var[x] = mean over batches of m/(m-1) * sigma2_B,

    where m is the number of values per channel in that batch (the paper's m/(m-1) E_B[sigma2_B]
    when every batch has the same size). Parameters, ``num_batches_tracked``, train/eval modes and
    all other state are left as they were. Batch Renorm keeps its moving mean and standard
    deviation: its training already normalizes towards them (r and d), so they are what its
    inference should use (the paper's point); Group Norm has no statistics to recompute. A batch
    that reaches a layer with NaN or inf values is left out of that layer's statistics, as in
    training, and a warning counts them; if every batch was, nothing changes and an error says so.

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
    model = name_layers(_convert_tree(model, kwargs))
    warn_left(model, lambda m: isinstance(m, BatchNorm), "convert",
              "only torch.nn.BatchNorm1d/2d/3d and SyncBatchNorm themselves become bnlab's (a lazy layer after "
              "its first forward)")
    return model


def _convert_tree(module: nn.Module, kwargs) -> nn.Module:
    new = _converted(module, kwargs)
    if new is not None:
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_tree(child, kwargs))
    return module


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
        track_running_stats=module.track_running_stats,
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None else None,
        **kwargs,
    )
    new.load_state_dict(module.state_dict())
    if module.affine:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new.train(module.training)
