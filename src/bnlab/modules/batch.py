"""Batch Normalization's layers: :class:`BatchNorm` (1d/2d/3d) and BN fused with its activation.

``BatchNorm1d/2d/3d`` are one class, :class:`BatchNorm`, with a rank check. They take
``torch.nn.BatchNorm*``'s constructor arguments and state_dict keys (a torch checkpoint loads into
bnlab and back) and add what users of torch's layers ask for: the running-statistics convention as
an explicit argument, a guard against non-finite batches, and errors that say what to do. Every
other normalizer of the package derives from :class:`BatchNorm`.
"""

from __future__ import annotations

import collections
import numbers
import sys
import warnings

import torch
import torch.fx
from torch import nn
from torch.nn.utils import prune

from bnlab import functional as F

STATS = ("ema", "cumulative")


REMEMBERED = 32  # training forwards a layer remembers for activation checkpointing's recomputation


def _real(name: str, value, low: float, high: float = float("inf"), why: str = "") -> float:
    """``value`` if it is a real number in [low, high] (NaN is not), else a ValueError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        raise ValueError(why or f"{name} must be a number in [{low}, {high}], got {value!r}")
    return value


def _steps(name: str, value) -> float:
    """``value`` if it is a number of iterations, 0 or more, else a ValueError naming the setting."""
    return _real(name, value, 0.0, why=f"{name} must be 0 or more iterations, got {value!r}")


def _check_momentum(layer: nn.Module, momentum):
    if momentum is not None:  # (None: torch's way to ask for the cumulative average)
        _real("momentum", momentum, 0.0, 1.0, f"momentum must be None (the cumulative average) or 0 <= momentum "
                                              f"<= 1, the weight of the new batch; got {momentum!r}")
    if not layer.__dict__.get("_stats_given", True):  # stats follows momentum, as torch's average does
        layer.__dict__["stats"] = "cumulative" if momentum is None else "ema"
    # (Keras' and TensorFlow's 0.9-0.999 mean the opposite)
    if momentum is not None and 0.5 < momentum < 1.0 and layer.__dict__.get("stats") == "ema":
        warnings.warn(f"momentum={momentum} is the new batch's weight here (PyTorch's convention), so the running "
                      f"statistics follow the last few batches; Keras' momentum={momentum} is "
                      f"momentum={1 - momentum:.4g} here", stacklevel=_caller_level())
    return momentum


def _check_choice(name: str, choices: tuple):
    def check(layer: nn.Module, value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    return check


_check_stats_choice = _check_choice("stats", STATS)


def _check_stats(layer: nn.Module, stats):
    _check_stats_choice(layer, stats)
    layer.__dict__["_stats_given"] = True  # (set by hand: momentum no longer changes it)
    return stats


class BatchNorm(nn.Module):
    """Batch Normalization (Ioffe & Szegedy 2015) over dimension 1 of an ``(N, C, *)`` input.

    Training: y = weight * (x - mu_B) / sqrt(sigma2_B + eps) + bias, with the batch's mean mu_B and
    biased variance sigma2_B per channel over N * prod(spatial) = m values (Algorithm 1). Then the
    running statistics fold the batch in, with the *unbiased* variance m/(m-1) * sigma2_B:

    - ``stats="ema"`` (default, PyTorch's convention): r <- (1 - momentum) * r + momentum * stat,
      ``momentum`` being the weight of the new batch (0.1; Keras' momentum=0.99 is 0.01 here);
    - ``stats="cumulative"`` (or ``momentum=None``): r <- r + (stat - r) / t after the t-th batch,
      the equal-weight average of every batch seen, as in Algorithm 2.

    Without ``stats``, the average follows ``momentum`` as torch's does, set now or later (None:
    cumulative, a number: the moving average); with ``stats`` given, ``stats`` decides.

    A batch whose statistics are not finite is not folded in (a warning names the layer), and
    ``num_batches_tracked`` counts the batches that were; its backward gives NaN gradients, as
    torch's does, for ``torch.amp.GradScaler`` to skip the step. Under torch.compile the same
    guard is one graph, without the warning (it would read the statistics on the host). An empty
    batch (N = 0) passes through as an empty output, with nothing folded in or counted (torch
    returns it too, but counts it). Under activation checkpointing (``torch.utils.checkpoint``,
    reentrant or not) the recomputation of a forward in the backward gives that forward's output
    and folds in or counts nothing (torch's BN folds every checkpointed batch in twice).
    Inference: the running statistics (Algorithm 2's affine transform); with
    ``track_running_stats=False`` batch statistics are used in both modes, as in torch. The
    settings (``eps``, ``momentum``, ``stats``, ``backend`` and a subclass's own, such as ghost
    BN's ``virtual_batch_size``) are checked as they are set, at construction or later
    (``setting_checks``): a value the constructor refuses raises at the line that sets it.

    Args:
        num_features: C.
        eps: added to the variance inside the square root.
        momentum: weight of the new batch in the running average; None means cumulative.
        affine: learn ``weight`` (gamma, init 1) and ``bias`` (beta, init 0).
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked`` buffers.
        stats: ``"ema"`` or ``"cumulative"``.
        backend: ``"auto"``, ``"native"`` (PyTorch's ATen kernels) or ``"autograd"`` (bnlab's
            hand-written backward); see :func:`bnlab.functional.batch_norm_train`.

    Example:
        >>> bn = BatchNorm2d(3)
        >>> y = bn(torch.randn(4, 3, 8, 8))          # training: batch statistics
        >>> y = bn.eval()(torch.randn(1, 3, 8, 8))    # inference: running statistics
    """

    ranks: tuple[int, ...] = ()  # accepted input ranks; empty means any rank >= 2
    passes_empty_batch = True  # training on an empty batch: an empty output, no statistics (not SyncBatchNorm)
    torch_twin_scripts = True  # whether the torch.nn layer that bnlab.to_torch swaps in compiles under torch.jit.script
    needs_running_stats = ""  # why a layer cannot go without running statistics (empty: it can, as BN)
    _version = 2  # torch's BN's: checkpoints from version 2 on hold num_batches_tracked
    per_channel = ("weight", "bias", "running_mean", "running_var")  # the state with one value per channel
    # The settings, each checked as it is set (__setattr__): what the constructor refuses is refused
    # after construction too, at the user's line, before a forward uses it.
    setting_checks = {
        "eps": lambda layer, eps: _real("eps", eps, 0.0, why=f"eps must be 0 or more, got {eps!r}"),  # (0 as in torch)
        "momentum": _check_momentum,
        "stats": _check_stats,
        "backend": _check_choice("backend", F.BACKENDS),
    }

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        stats: str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        given = stats is not None
        if stats is None:
            stats = "cumulative" if momentum is None else "ema"
        if stats == "ema" and momentum is None:
            raise ValueError(f"stats='ema' needs 0 <= momentum <= 1 (weight of the new batch), got {momentum}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.stats = stats  # (before momentum, whose check warns for stats="ema" only)
        self.__dict__["_stats_given"] = given  # (not given: it follows momentum, set now or later)
        self.eps = eps  # (these settings are checked as they are set, here and later: __setattr__)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.name: str | None = None  # set by name_layers(); used in warnings
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def __setattr__(self, name: str, value) -> None:
        check = self.setting_checks.get(name)
        if check is not None:  # a setting: refused at the line that sets it, at construction or later
            value = check(self, value)
        super().__setattr__(name, value)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, stats={self.stats!r}, backend={self.backend!r}"
        )

    def _label(self) -> str:
        return f"{type(self).__name__} {self.name!r}" if self.name else repr(self)

    def _refuse_without_running_stats(self) -> None:
        """The error for a layer that needs its running statistics (``needs_running_stats``) whose
        ``track_running_stats`` was set False, or ``running_mean`` None, after construction."""
        raise ValueError(f"{self._label()}: {self.needs_running_stats}, so it keeps running statistics, but "
                         "track_running_stats was set False or running_mean None (as test-time adaptation recipes "
                         "do to BN layers: keep such a recipe to BN). For batch statistics in eval mode too, use "
                         "bnlab.BatchNorm1d/2d/3d(..., track_running_stats=False)")

    def _refuse_data_parallel(self, why: str) -> None:
        """Raise in a copy that ``nn.DataParallel`` made of this layer (torch marks them
        ``_is_replica``): it copies the model onto each GPU at every forward and runs the copies in
        threads of one process. ``why``: what this layer needs that such a copy lacks."""
        if self.__dict__.get("_is_replica", False):  # (not getattr: nn.Module's miss raises inside, each step)
            raise RuntimeError(f"{self._label()} cannot train inside nn.DataParallel: {why}. Use "
                               "DistributedDataParallel, one process per device (torchrun), as torch recommends")

    def __prepare_scriptable__(self):
        """torch.jit.script's hook, called on every module of a model before compiling it: bnlab's
        layers run Python TorchScript cannot compile (numba kernels, host-side checks), so say so
        and what to use, instead of TorchScript's error about a line deep in torch."""
        advice = ("" if self.torch_twin_scripts else
                  " (bnlab.to_torch would give torch.nn.SyncBatchNorm, which TorchScript does not compile either)")
        raise TypeError(f"torch.jit.script cannot compile {self._label()}: bnlab's layers run Python "
                        "(numba kernels, checks on the host). For deployment, export the model in eval mode with "
                        "torch.export (or bnlab.fuse it first), or swap the layers for torch.nn's with "
                        f"bnlab.to_torch(model) (the same inference) and script that{advice}")

    def _check_input(self, x: torch.Tensor) -> None:
        if self.ranks and x.dim() not in self.ranks:
            expected = " or ".join(f"{r}D" for r in self.ranks)
            raise ValueError(
                f"{type(self).__name__}: expected {expected} input, got {x.dim()}D input of shape "
                f"{tuple(x.shape)}"
            )
        running_mean = self._buffers.get("running_mean")
        F.check_input(x, self.num_features, self.training, self._label, running_stats=running_mean is not None,
                      state_dtype=F.state_dtype(self.weight, running_mean))

    def _check_state(self) -> None:
        """Shape ``(C,)`` for each parameter and running statistic, as :func:`bnlab.functional.batch_norm`
        and torch's BN check: one replaced after construction by a shorter one would otherwise be read
        past its end by the kernels (torch's native kernel, which bnlab calls, does not check)."""
        params, buffers = self._parameters, self._buffers
        for name in self.per_channel:
            t = params.get(name, buffers.get(name))
            if t is not None and t.shape != (self.num_features,):
                raise ValueError(f"{self._label()}: its {name} has shape {tuple(t.shape)}, expected "
                                 f"({self.num_features},), one value per channel; a parameter or buffer replaced "
                                 "after construction must keep that shape")

    def batch_weight(self) -> "float | torch.Tensor":
        """The new batch's weight in the running average: momentum, or 1/t for the t-th batch (a
        0-d tensor while torch.compile traces: read on the host, the count would break the graph)
        with ``stats="cumulative"`` or ``momentum`` None, set so after construction too (torch's way
        to ask for the cumulative average, which ``torch.optim.swa_utils.update_bn`` takes)."""
        if self.stats == "cumulative" or self.momentum is None:
            if self.num_batches_tracked is None:  # (track_running_stats=False: nothing to average into)
                return 0.0
            if torch.compiler.is_compiling():
                return 1.0 / (self.num_batches_tracked + 1).double()
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx's symbolic tracing: one node, a leaf like torch.nn's layers
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        self._check_input(x)
        self._check_state()
        statistics = self._buffers.get("running_mean") is not None
        if self.needs_running_stats and not (self.track_running_stats and statistics):
            self._refuse_without_running_stats()
        if not self.training and statistics:  # (as torch's: track_running_stats set False after construction
            return self._inference(x)  # stops the updates, not their use in eval mode)
        if x.numel() == 0 and self.passes_empty_batch:
            return F.empty_batch(x, self.weight, self.bias)
        counting = self.training and self.track_running_stats and not F.recomputing()
        tracking = self.training and self.track_running_stats and statistics
        if tracking and not counting:  # activation checkpointing: this forward again, in the backward
            return self._recompute(x)
        y, folded = self._train(x, tracking)
        if tracking and folded is not None:  # (None: there was no batch to fold in)
            self.count_batch_(folded)
        elif counting and not statistics and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # (the flag set True again without the buffers: torch's BN counts)
        return y

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        """The training output again, when activation checkpointing recomputes this forward in the
        backward (:func:`bnlab.functional.recomputing`): the same statistics, and nothing folded
        in or counted a second time. BN's output depends on the batch alone. Layers whose output
        depends on state that their forward changed (Batch Renorm's moving averages,
        cross-iteration BN's window) keep that state with :meth:`_remember` and find it with
        :meth:`_recall`.

        The same ops run as in the forward, on copies of the running statistics: the non-reentrant
        checkpoint checks that a recomputation saves the same tensors for the backward."""
        buffers = self._buffers
        kept = {name: buffer for name, buffer in buffers.items() if buffer is not None}
        try:
            buffers.update((name, buffer.clone()) for name, buffer in kept.items())
            return self._train(x, True)[0]
        finally:
            buffers.update(kept)

    def _remember(self, mean, var, state) -> None:
        """Record what a training forward's output depended on besides its batch (``state``), under
        the batch's per-channel ``mean`` and biased ``var``, for a recomputation of that forward.
        The last ``REMEMBERED`` forwards are kept (a checkpointed step needs its own; a backward
        with ``retain_graph=True`` may recompute it twice)."""
        records = self.__dict__.get("_records")
        if records is None:
            records = self.__dict__["_records"] = collections.deque(maxlen=REMEMBERED)
        records.append([mean, var, state, None])  # (the last: the backward pass that recalled it)

    def _recall(self, x: torch.Tensor):
        """The state :meth:`_remember` kept for the latest forward on the batch ``x``.

        Records are found by the batch's statistics, so two forwards on identical batches cannot be
        told apart. Where both could be the one recomputed (the latest was recalled already in this
        backward pass: the layer ran twice on identical batches inside checkpointed segments) and
        their states differ, it raises rather than give one call the other's output."""
        mean, var = F.batch_key(x)
        matches = (record for record in reversed(self.__dict__.get("_records") or ())
                   if F.same_batch(mean, var, record[0], record[1], self.eps))
        latest = next(matches, None)  # (the older ones only looked at when needed: a few torch ops each)
        if latest is not None:
            task = torch._C._current_graph_task_id()
            older = next(matches, None) if latest[3] == task else None
            if older is not None and not _same_state(latest[2], older[2]):
                raise RuntimeError(f"{self._label()}: recomputed inside a backward pass (activation checkpointing) "
                                   "for a second call on an identical batch: its output depends on state each call "
                                   "changed, and the calls cannot be told apart by their batches. Keep the layer "
                                   "outside the checkpointed segments, or do not give it identical batches twice "
                                   "before one backward")
            latest[3] = task
            return latest[2]
        raise RuntimeError(f"{self._label()}: recomputed inside a backward pass (activation checkpointing) on a batch "
                           f"that none of its last {REMEMBERED} training forwards normalized. Its output depends on "
                           "state its forward changed, so it can only repeat a forward it recorded: recompute the "
                           "same batch (torch.utils.checkpoint with preserve_rng_state=True, its default, when "
                           "dropout comes before the layer), or keep the layer outside the checkpointed segment")

    def __getstate__(self):
        # copy.deepcopy and pickle: the records belong to this layer's forwards, not the copy's
        return {**super().__getstate__(), "_records": None}

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """Algorithm 2: the running statistics. Subclasses change what follows or precedes it."""
        return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                 self.backend)

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        """Batch statistics; folds the batch into the running buffers when ``tracking``.
        Returns the output and whether the batch was folded in (None: nothing to fold, as for an
        empty batch). Subclasses change the statistics."""
        y, _, _, folded = F.batch_norm_train(
            x, self.weight, self.bias, self.eps, self.backend,
            self.running_mean if tracking else None, self.running_var if tracking else None, self.batch_weight(),
        )
        return y, folded

    def count_batch_(self, folded: "bool | torch.Tensor") -> None:
        """Count a batch folded into the running statistics, or warn that it was skipped.

        Under torch.compile ``folded`` is a 0-d bool tensor (:func:`bnlab.functional.fold_if_finite_`):
        counted without reading it on the host, so without the warning."""
        if isinstance(folded, torch.Tensor):
            self.num_batches_tracked.add_(folded.to(self.num_batches_tracked.dtype))
        elif folded:
            self.num_batches_tracked.add_(1)
        else:
            warnings.warn(
                f"{self._label()}: non-finite batch statistics (NaN or inf in the input, or a variance "
                "beyond the running statistics' dtype); this batch was not folded into the running statistics",
                RuntimeWarning,
                stacklevel=3,
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        warn_poisoned(state_dict, prefix, type(self).__name__)  # (the checkpoint's own keys, before any upgrade)
        self._upgrade_checkpoint(state_dict, prefix, local_metadata.get("version"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _upgrade_checkpoint(self, state_dict, prefix: str, version: int | None) -> None:
        """Fill in, in place, what an older checkpoint lacks, as torch's BN does: one from torch <
        0.4.1 (no version, or version 1) has no num_batches_tracked, and the layer keeps its own
        count. From version 2 on (torch's and bnlab's checkpoints) a missing count is a missing key,
        as in torch: with ``momentum=None`` the count weighs the running statistics."""
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict and (version is None or version < 2):
            own = self.num_batches_tracked
            state_dict[key] = own if own is not None and not own.is_meta else torch.tensor(0, dtype=torch.long)


def warn_poisoned(state_dict, prefix: str, owner: str) -> None:
    """Warn, at the user's load_state_dict line, when a checkpoint's running statistics hold NaN,
    inf or a negative spread: torch's BN folds a NaN batch in for good, and a checkpoint saved
    after one gives NaN in every inference. Loaded all the same (recalibration can mend it)."""
    found = []
    for name in ("running_mean", "running_var", "running_std"):
        t = state_dict.get(prefix + name)
        if t is None or not t.is_floating_point() or t.is_meta:  # (meta: a model built without memory)
            continue
        bad = ~torch.isfinite(t) if name == "running_mean" else ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            channels = bad.nonzero().flatten().tolist()
            found.append(f"{name} at {len(channels)} channel(s) ({', '.join(map(str, channels[:5]))}"
                         f"{', ...' if len(channels) > 5 else ''})")
    if found:
        layer = repr(prefix[:-1]) if prefix else owner
        warnings.warn(f"{layer}: the checkpoint's {' and '.join(found)} are NaN, inf or negative, "
                      "so inference with them gives NaN (a NaN batch folded into torch's running statistics "
                      "does this). Recompute them with bnlab.recalibrate(model, batches), or train on",
                      RuntimeWarning, stacklevel=_caller_level(outside=("bnlab.", "torch.")))


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` over ``(N, C)`` or ``(N, C, L)`` inputs."""

    ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` over ``(N, C, H, W)`` inputs."""

    ranks = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` over ``(N, C, D, H, W)`` inputs."""

    ranks = (5,)


class BatchNormAct(BatchNorm):
    """Batch Normalization followed by an activation, fused: y = act(BN(x)).

    ``act`` is ``"relu"`` (default), ``"leaky_relu"`` (slope ``negative_slope``), ``"silu"``,
    ``"sigmoid"`` or ``"identity"``. The state_dict keys are BN's, so a BN checkpoint loads into
    it. Training with ReLU or leaky ReLU on large float32/float64 CPU tensors runs bnlab's fused
    kernels (two passes over the data forward, three backward, against five and eight for BN then
    the activation; see benchmarks/RESULTS.md); SiLU and sigmoid, whose exp the kernels compute one value at a time,
    run BN then torch's activation unless ``backend="fused"``; CUDA tensors run the Triton kernels
    (float64 ones torch's, whose arithmetic is float64).
    Inference: the running statistics, then ``act``; on CUDA, without an autograd graph to build
    (``torch.no_grad()``, ``bnlab.evaluating``), one Triton pass with the folded scale and shift.

    Example:
        >>> layer = BatchNormAct2d(64, act="relu")
        >>> y = layer(torch.randn(8, 64, 32, 32))   # == relu(BatchNorm2d(64)(x))
    """

    setting_checks = {
        **BatchNorm.setting_checks,
        "act": _check_choice("act", F.ACTIVATIONS),
        "negative_slope": lambda layer, slope: _real("negative_slope", slope, -float("inf"),
                                                     why=f"negative_slope must be a number, got {slope!r}"),
    }

    def __init__(self, num_features: int, act: str = "relu", negative_slope: float = 0.01, **kwargs):
        super().__init__(num_features, **kwargs)
        self.act = act
        self.negative_slope = negative_slope

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm_act_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                     self.act, self.negative_slope, self.backend)

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        y, _, _, folded = F.batch_norm_act_train(
            x, self.weight, self.bias, self.eps, self.act, self.negative_slope, self.backend,
            self.running_mean if tracking else None, self.running_var if tracking else None, self.batch_weight(),
        )
        return y, folded


class BatchNormAct1d(BatchNormAct):
    """:class:`BatchNormAct` over ``(N, C)`` or ``(N, C, L)`` inputs."""

    ranks = (2, 3)


class BatchNormAct2d(BatchNormAct):
    """:class:`BatchNormAct` over ``(N, C, H, W)`` inputs (NCHW or channels_last)."""

    ranks = (4,)


def _same_state(a, b) -> bool:
    """Whether two recorded states (:meth:`BatchNorm._remember`: tuples of tensors, NumPy arrays and
    numbers) are equal, so that either gives a recomputation the same output."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same_state, a, b))
    if hasattr(a, "shape") or hasattr(b, "shape"):  # (tensors, and NumPy arrays: the fused CBN forward's statistics)
        a, b = (torch.as_tensor(t) if hasattr(t, "shape") else None for t in (a, b))
        return a is not None and b is not None and a.dtype == b.dtype and F.same_values(a, b)
    return a == b


def _caller_level(outside: tuple[str, ...] = ("bnlab.",)) -> int:
    """``warnings.warn``'s stacklevel of the first caller outside the packages ``outside`` (a
    subclass's __init__ calls BatchNorm's, torch's load_state_dict recurses: the warning should
    point at the user's line, not at bnlab's or torch's)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(outside):
        frame, level = frame.f_back, level + 1
    return level


BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, BatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """True for bnlab's and torch.nn's batch-normalization layers (torch's BatchNorm1d/2d/3d, their
    lazy forms and SyncBatchNorm; every bnlab layer), False for other normalizations (Group, Layer
    and Instance Norm). bnlab's layers are not subclasses of torch's private ``_BatchNorm``: use
    this where code asks ``isinstance(m, _BatchNorm)``, such as a rule that exempts BN's
    parameters from weight decay.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNorm2d(8), nn.ReLU())
        >>> [name for name, m in model.named_modules() if is_batch_norm(m)]
        ['1']
    """
    return isinstance(module, BATCH_NORM_TYPES)


def momentum_argument(layer: nn.Module) -> float | None:
    """``layer``'s momentum as the constructors take it: None for a cumulative average (torch's
    ``momentum=None``, bnlab's ``stats="cumulative"``), so a converted layer keeps its convention."""
    return None if layer.momentum is None or getattr(layer, "stats", None) == "cumulative" else layer.momentum


def carry_state(old: nn.Module, new: BatchNorm) -> BatchNorm:
    """``new`` with ``old``'s state, what each converter does to a layer it swaps (:func:`convert`,
    ``SyncBatchNorm.convert``, :func:`cross_iteration`): the values of its state_dict, its
    parameters themselves (so an optimizer made before the conversion still steps them, as after
    torch's ``convert_sync_batchnorm``, and a frozen gamma stays frozen), the train/eval mode, the
    ``track_running_stats`` flag (``new`` made with buffers wherever ``old`` has them), and a mask
    of ``torch.nn.utils.prune`` put back on the same parameter (network slimming prunes BN's
    gammas)."""
    masks = {hook._tensor_name: getattr(old, hook._tensor_name + "_mask")
             for hook in old._forward_pre_hooks.values() if isinstance(hook, prune.BasePruningMethod)}
    state = old.state_dict()
    for name in masks:  # (pruned: name_orig and name_mask in the state, name set by the hook)
        state[name] = state.pop(name + "_orig")
        del state[name + "_mask"]
    try:
        new.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"cannot carry {type(old).__name__}'s state over to {type(new).__name__} ({err}); a weight "
                         "that a forward hook sets from other parameters (the older torch.nn.utils.weight_norm or "
                         "spectral_norm) must be made plain first") from err
    for name, mask in masks.items():
        prune.custom_from_mask(new, name, mask)
    for name, parameter in new._parameters.items():  # (pruned: both layers hold name_orig)
        if parameter is not None:
            new._parameters[name] = old._parameters[name]
    new.track_running_stats = old.track_running_stats  # (set False after construction: its buffers kept)
    return new.train(old.training)


def warn_left(model: nn.Module, converted, who: str, becomes: str) -> None:
    """A converter's warning naming the batch-norm layers of ``model`` it leaves as they are: those
    for which ``converted(layer)`` (what it swaps, or has swapped before) is false."""
    left = [f"{name!r} ({type(m).__name__})" for name, m in model.named_modules() if is_batch_norm(m)
            and not converted(m)]
    if left:
        warnings.warn(f"{who}: left as they were: {', '.join(left)}; {becomes}", stacklevel=_caller_level())


def trace_graph(model: nn.Module):
    """``model``'s torch.fx graph, every batch-norm layer (bnlab's too, like torch.nn's) a leaf:
    one ``call_module`` node a call. Raises what torch.fx raises for a model it cannot trace."""
    return torch.fx.Tracer().trace(model)


def forward_arguments(example_inputs) -> tuple:
    """A model's forward arguments from ``example_inputs``: one tensor, or a tuple (or list) of them."""
    return (example_inputs,) if torch.is_tensor(example_inputs) else tuple(example_inputs)


def name_layers(model: nn.Module) -> nn.Module:
    """Give every bnlab layer its qualified name in ``model``, so its warnings and errors say which
    layer (:func:`convert`, :func:`cross_iteration` and ``SyncBatchNorm.convert`` call it; call it
    after building a model of bnlab's layers yourself).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(BatchNorm1d(4), nn.ReLU()))
        >>> name_layers(model)[1][0].name
        '1.0'
    """
    for name, module in model.named_modules():
        if isinstance(module, BatchNorm):
            module.name = name or type(module).__name__
    return model
