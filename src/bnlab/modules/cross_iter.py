"""Cross-Iteration Batch Normalization (Yao et al. 2020): the layer, its window, and the model converter."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from bnlab import functional as F
from bnlab.autograd import (CrossIterationNormFunction, FusedCrossIterationNormFunction,
                             ReplayedCrossIterationNormFunction)
from bnlab.modules.batch import (BatchNorm, BatchNorm1d, BatchNorm2d, _caller_level, _steps, carry_state,
                                 forward_arguments, momentum_argument, name_layers, trace_graph, warn_left)

# The window, in the order the kernels of bnlab.kernels.cpu_cbn take it
WINDOW_BUFFERS = ("window_mu", "window_nu", "window_bias", "window_dmu", "window_dnu", "window_dmu_w", "window_dnu_w",
                  "window_valid")
# The window's per-channel statistics, kept in float64 whatever the layer's dtype: nu and the
# products <d nu/dW, W> are of the size of mu^2, and the pooled variance is their difference with
# mu^2, so in float32 a channel whose mean is 1,000 times its spread lost the variance whole.
WINDOW_STATISTICS = ("window_mu", "window_nu", "window_bias", "window_dmu_w", "window_dnu_w")


def _fixed(layer: nn.Module, name: str, value, why: str):
    """``value`` for a setting that shapes the window's buffers: taken once, at construction; a
    different one later is refused, saying what to do instead."""
    if name in layer.__dict__ and value != layer.__dict__[name]:
        raise AttributeError(f"{layer._label()}: {name} is fixed at construction ({why}); for {name}={value!r}, "
                             "make a new layer with it, pair it with the producer, and load this one's state_dict "
                             "without the keys window_* and iteration (an empty window at iteration 0)")
    return value


def _statistics_dtype(device) -> torch.dtype:
    """float64, but on a device without it (Apple's MPS), float32."""
    return torch.float32 if torch.device(device if device is not None else "cpu").type == "mps" else torch.float64


def _any(flags: torch.Tensor) -> bool:
    """Whether any flag is set; False for a meta tensor (a model built without memory has no window)."""
    return not flags.is_meta and bool(flags.any())


class CrossIterationBatchNorm(BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al. 2020) after a Linear or Conv2d producer.

    At iteration t the statistics pool the current batch with the last ``window - 1`` iterations',
    each compensated to the producer's current weights by a first-order Taylor expansion
    (:func:`bnlab.functional.compensated_window`): mu_bar = mean of mu, nu_bar = mean of
    max(nu, mu^2), sigma2 = nu_bar - mu_bar^2, y = weight * (x - mu_bar) / sqrt(sigma2 + eps) + bias.
    Gradients flow through the current iteration's statistics only. For the first ``burn_in``
    iterations, and with ``window=1``, it is BN. ``compensate=False`` pools the raw past
    statistics (the paper's "naive CBN"). The running statistics follow the current batch, as BN's;
    inference uses them, as BN.

    Gradients reach the weights through the current iteration's 1/k share of the statistics only, so
    the layer loses two invariances of BN. Its output is no longer invariant to the producer's
    weight scale: started early at a high learning rate, the weights and gammas grow. And a shift of
    a channel's mean gets (1 - 1/k) of its gradient instead of none, while the next steps' window,
    compensated to the shifted weights, follows the shift: nothing pulls the mean back, so at a high
    learning rate the producer's output wanders from step to step, the running statistics lag behind
    it, the first-order compensation of nu errs more, and accuracy can collapse (the small-batch
    experiment's quick run, README). Start pooling where the learning rate is low: the official
    detection config turns CBN on after epoch 8 of 12, where mmdetection's 1x schedule divides the
    learning rate by 10 (the experiment's ``--lr-drop``).

    The window (statistics, their weight derivatives and the derivatives' products with the
    weights they were taken at, the biases, which entries are filled) and the iteration count are
    buffers: a checkpoint resumes CBN exactly (loaded before or after pairing) and ``.to()`` moves
    them. A BN checkpoint (torch's or bnlab's: a pretrained backbone) loads too, with an empty
    window at iteration 0. The layer must be paired with its producer before its first training
    forward: ``layer.pair(conv)``, or ``bnlab.cross_iteration(model)`` for a whole model. The window
    is each process's own: under DistributedDataParallel a model from :func:`cross_iteration`
    keeps it out of DDP's buffer broadcast; for layers paired by hand, wrap with
    ``broadcast_buffers=False`` (else every rank pools rank 0's past statistics).
    ``nn.DataParallel``, whose copies of the model are unpaired, is refused in training. Under
    activation checkpointing the recomputation of a forward normalizes with the statistics that
    forward pooled (the layer keeps them for its last 32 forwards, found by the batch's
    statistics: two calls on identical batches before one backward, inside checkpointed segments,
    cannot be told apart and raise where their states differ), and stores and counts nothing.
    Low precision (``torch.autocast``, or ``model.half()``/``.to(torch.bfloat16)``): the statistics
    and derivatives are float32, and the window's derivatives stay float32 through a conversion
    (the compensation's differences would cancel in 8 or 11 bits); the output has the input's dtype.
    The window's per-channel statistics (mu, nu, the biases and the derivatives' products with the
    weights) are float64 in every model, through ``.float()`` too (float32 on Apple's MPS, which
    has no float64): nu and the products are of the size of mu^2 and the pooled variance is their
    difference with mu^2, so in float32 a channel whose mean is 1,000 times its spread would lose
    its variance whole.

    Speed: d mu/dW is the mean input patch and d nu/dW one weight-gradient reduction (torch's
    kernel for a conv, called from the producer's forward hook), never extra autograd passes.
    With ``backend="auto"`` a training step on float32/64 CPU tensors runs on the numba kernels
    of :mod:`bnlab.kernels.cpu_cbn` (moments, compensation, pooling and normalization in one call;
    the running statistics and the window in two more); elsewhere, or with ``backend="native"``,
    on torch ops (any device; the tests hold the two paths to the same steps). The burn-in's
    iterations before the last ``window - 1`` are plain BN and store nothing.

    Example:
        >>> conv = nn.Conv2d(3, 16, 3, bias=False)
        >>> cbn = CrossIterationBatchNorm2d(16, window=4, burn_in=100).pair(conv)
        >>> y = cbn(conv(torch.randn(4, 3, 32, 32)))
    """

    needs_running_stats = "cross-iteration BN's inference normalizes with running statistics (its window is training's)"
    setting_checks = {
        **BatchNorm.setting_checks,
        "burn_in": lambda layer, iterations: _steps("burn_in", iterations),
        # (the kernels would index past the buffers' ends: a segmentation fault)
        "window": lambda layer, window: _fixed(layer, "window", window, "it shapes the window's buffers"),
        "compensate": lambda layer, compensate: _fixed(layer, "compensate", compensate,
                                                       "naive CBN keeps no derivatives in its window"),
    }

    def __init__(self, num_features, window: int = 4, burn_in: int = 0, compensate: bool = True, eps=1e-5,
                 momentum=0.1, affine=True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, backend=backend)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.compensate, self.burn_in = window, compensate, burn_in  # (the first two fixed from here)
        factory = {"device": device, "dtype": self._derivatives_dtype(self.running_mean.dtype)}
        statistics = {"device": device, "dtype": _statistics_dtype(device)}
        past = window - 1
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("window_valid", torch.zeros(past, dtype=torch.bool, device=device))
        self.register_buffer("window_mu", torch.zeros(past, num_features, **statistics))
        self.register_buffer("window_nu", torch.zeros(past, num_features, **statistics))
        self.register_buffer("window_bias", torch.zeros(past, num_features, **statistics))
        self.register_buffer("window_dmu_w", torch.zeros(past, num_features, **statistics))  # <d mu/d W, W> then
        self.register_buffer("window_dnu_w", torch.zeros(past, num_features, **statistics))  # <d nu/d W, W> then
        for name in ("window_dmu", "window_dnu"):  # shaped by the producer: allocated by pair()
            self.register_buffer(name, torch.zeros(past, 0, **factory))
        self.__dict__["_producer"] = None  # a plain reference: not a submodule, not in state_dict
        self.__dict__["_input"] = None

    @property
    def producer(self):
        return self.__dict__["_producer"]

    def pair(self, producer: nn.Module) -> "CrossIterationBatchNorm":
        """Use ``producer`` (the Linear or Conv2d whose output this layer normalizes)."""
        if not isinstance(producer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"cross-iteration BN needs a Linear or Conv2d producer, got {type(producer).__name__}")
        if isinstance(producer.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"{self._label()}: its producer, a {type(producer).__name__}, is lazy and has no weight "
                             "yet; run one forward pass first (bnlab.cross_iteration(model, example_inputs=...) "
                             "runs one)")
        if producer.weight.shape[0] != self.num_features:
            raise ValueError(f"the producer has {producer.weight.shape[0]} outputs, this layer "
                             f"{self.num_features} channels")
        # d mu / d W: one mean patch per group of the producer, (G, F); d nu / d W: (C, F).
        # Naive CBN never compensates, so it keeps no derivatives (empty buffers).
        past, c = self.window - 1, self.num_features
        groups = getattr(producer, "groups", 1)
        fan_in = producer.weight[0].numel()
        shapes = {"window_dmu": (past, groups, fan_in), "window_dnu": (past, c, fan_in)}
        for name, shape in shapes.items():
            shape = shape if self.compensate else (past, 0)
            if getattr(self, name).shape != shape:
                if _any(self.window_valid):  # (a window loaded before pairing: never replaced silently)
                    raise ValueError(f"{self._label()}: its window holds derivatives for a producer of shape "
                                     f"{tuple(getattr(self, name).shape[1:])}, this producer's are {shape[1:]}; "
                                     "pair it with the layer it was trained after")
                setattr(self, name, torch.zeros(shape, dtype=self.window_dnu.dtype, device=self.window_dnu.device))
        self._unhook()  # (paired before: one hook, on the current producer only)
        self.__dict__["_producer"] = producer
        self.__dict__["_checked"] = False
        # A first conv (a small fan-in, at most C): d nu/dW from its patches' second moments on the numba
        # kernels, cheaper than torch's weight-gradient reduction there (cpu_cbn.store_conv_moments)
        self.__dict__["_moments"] = self.compensate and isinstance(producer, nn.Conv2d) and F.moments_pay(
            groups, fan_in, c, producer.stride[1])
        self.__dict__["_hook"] = producer.register_forward_hook(self._capture)
        return self

    def _unhook(self) -> None:
        """Remove the forward hook this layer keeps on its producer (pair() sets it; a layer that
        leaves the model, folded or swapped for torch's, must not leave it behind)."""
        hook = self.__dict__.pop("_hook", None)
        if hook is not None:
            hook.remove()

    @F.eager_under_compile  # (with _train: numba kernels and NumPy views)
    def _capture(self, module, args, output):
        """The producer's forward hook: keep its input for the derivatives of this iteration's
        statistics. A conv's weight gradient from its output (d nu/dW up to 2/m) is taken here,
        straight after the conv, while its input and output are still in cache: the call costs
        less than after the normalization (``benchmarks/RESULTS.md``)."""
        if not self.training or F.recomputing():  # (a recomputation takes no derivatives: _recompute)
            self.__dict__["_input"] = None
            return
        u = args[0].detach()
        if not self.__dict__.get("_checked"):  # once per pairing: the compensation's premise
            plain = F.is_plain_producer(module, u, output)
            if plain is False:
                raise ValueError(f"{self._label()}: its producer's output is not the {type(module).__name__} of its "
                                 "input by producer.weight and producer.bias (a subclass with its own forward, such as "
                                 "a weight-standardized conv, or a hook that changes the output?); the compensation "
                                 "needs x = W * u + b with W = producer.weight. Transform the weight with "
                                 "torch.nn.utils.parametrize instead, or keep BN there")
            self.__dict__["_checked"] = plain is True
        gradient = None
        if self.compensate and isinstance(module, nn.Conv2d) and self._stores(int(self.iteration)) and not (
                self.__dict__["_moments"] and self.backend == "auto" and u.is_cpu):
            gradient = F.conv_weight_gradient(output, u, module)
        self.__dict__["_input"] = (u, output, gradient)

    def reset_running_stats(self) -> None:
        """BN's reset, and the window emptied too: its entries are statistics of past batches. The
        iteration count, which the burn-in counts, is kept."""
        super().reset_running_stats()
        if "window_valid" in self._buffers:  # (BatchNorm.__init__ resets before the window exists)
            for name in WINDOW_BUFFERS:
                getattr(self, name).zero_()

    def reset_parameters(self) -> None:
        """The layer as new: BN's parameters and running statistics, the window emptied and the
        iteration count back at 0, so the burn-in starts again (after ``to_empty()`` from the meta
        device, whose memory holds anything)."""
        super().reset_parameters()
        self.iteration.zero_()

    def extra_repr(self) -> str:
        return f"{self.num_features}, window={self.window}, burn_in={self.burn_in}, compensate={self.compensate}"

    def _past_statistics(self, filled: int):
        """The window's valid entries, compensated to the producer's current weights (or raw, when
        naive), clipped by nu >= mu^2: their sums ``(C,)`` and how many there are."""
        # The filled entries are a prefix unless a non-finite batch left a hole: slice, else mask.
        past = slice(0, filled) if bool(self.window_valid[:filled].all()) else self.window_valid
        mu, nu = self.window_mu[past], self.window_nu[past]
        if self.compensate:
            mu, nu = F.compensated_window(
                mu, nu, self.window_dmu[past], self.window_dnu[past], self.window_dmu_w[past], self.window_dnu_w[past],
                self.window_bias[past], *self._producer_weights())
        return mu.sum(0), torch.maximum(nu, mu * mu).sum(0), mu.shape[0]

    def _stores(self, iteration: int) -> bool:
        """Whether this training step stores a window entry; else it is plain BN.

        The window is read from iteration ``burn_in`` on, so only the ``window - 1`` iterations
        before it need storing: the burn-in's earlier iterations are plain BN at BN's cost, and so
        is recalibration (:func:`bnlab.recalibrate`).
        """
        return not self._recalibrating and self.window > 1 and iteration >= self.burn_in - (self.window - 1)

    @property
    def _recalibrating(self) -> bool:
        """Inside :func:`bnlab.recalibrate`: batch statistics as BN's, nothing stored or counted."""
        return self.__dict__.get("_batch_statistics", False)

    @F.eager_under_compile
    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        self._refuse_data_parallel("its window pairs it with its producer, and DataParallel makes new copies of both "
                                   "at every forward")
        producer, captured = self.producer, self.__dict__["_input"]
        self.__dict__["_input"] = None
        if producer is None:
            raise RuntimeError(f"{self._label()}: not paired with its producer; call layer.pair(conv_or_linear) "
                               "or bnlab.cross_iteration(model) first")
        if captured is None or captured[0].shape[0] != x.shape[0]:
            raise RuntimeError(f"{self._label()}: its producer did not run on this batch just before it; the "
                               "input must be the paired layer's output")
        u, output, gradient = captured
        if output is not x:  # (a copy, or a compiled graph's own tensor: the values must be the output's)
            if not F.same_values(output, x):
                raise RuntimeError(f"{self._label()}: its input is not its producer's output (something between them "
                                   "changed the values: an activation, dropout, a scale); the compensation assumes "
                                   "x = producer(u). Put the layer straight after its producer, or keep BN there")
            gradient = None  # (taken from the output, perhaps in another dtype: take x's own)
        dtype = x.dtype
        if dtype in F.LOW_PRECISION:  # (autocast, or a model converted whole: statistics, window and
            x, u = x.float(), u.float()  # derivatives in float32, as BN's statistics)
        iteration = int(self.iteration)
        if not self._stores(iteration):
            y, mean, var, folded = self._batch_norm(x)
            self._remember(mean, var, ("bn",))
        else:
            pooling, slot = iteration >= self.burn_in, iteration % (self.window - 1)
            state = self._kernel_state(x)
            if state is not None:
                y, folded = self._train_fused(state, x, u, gradient, pooling, slot)
            else:
                y, folded = self._train_torch(x, u, gradient, pooling, slot)
        if not self._recalibrating:
            self.iteration.add_(1)
        return y.to(dtype), folded

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        """The forward again for activation checkpointing, with the pooled statistics that forward
        normalized with (the window has changed since: an entry replaced, the producer stepped) and
        the gradient through this batch's share, through the same autograd function; nothing
        stored or counted."""
        self.__dict__["_input"] = None
        dtype = x.dtype
        if dtype in F.LOW_PRECISION:
            x = x.float()
        path, *recorded = self._recall(x)
        if path == "bn":  # the same call as the forward's, on copies of the running statistics
            y = self._batch_norm(x, fold=False)[0]
        elif path == "pooled":
            past_mu, past_nu, k = recorded
            y = self._pooled_norm(x, past_mu, past_nu, k)[0]
        else:  # the numba kernels' forward, with the window's part of the statistics it wrote
            past = F.pooled_past_sums(recorded[0], self.eps)
            y = ReplayedCrossIterationNormFunction.apply(x, self.weight, self.bias, self.eps, past,
                                                         self._kernel_state(x).norm, np.empty((5, x.shape[1])))
        return y.to(dtype)

    def _pooled_norm(self, x: torch.Tensor, past_mu, past_nu, k: int):
        """y, mu_B, sigma2_B with the pooled statistics (:class:`CrossIterationNormFunction`); under
        torch.func's transforms or forward-mode AD (:func:`bnlab.functional.transformed`), which cannot
        see through that function, the same in differentiable torch ops."""
        pooled = F.cross_iteration_normalize if F.transformed() else CrossIterationNormFunction.apply
        return pooled(x, *self._affine(x), past_mu, past_nu, k, self.eps)

    def _affine(self, x: torch.Tensor):
        """gamma and beta in x's dtype: float32 for a layer converted to float16/bfloat16 (the cast
        is differentiable), whose statistics are float32."""
        weight, bias = self.weight, self.bias
        if weight is not None and weight.dtype != x.dtype:
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return weight, bias

    def _producer_weights(self):
        """The producer's weight and bias (None without one) now, detached, in the window's dtype."""
        producer, dtype = self.producer, self.window_mu.dtype
        bias = producer.bias.detach().to(dtype) if producer.bias is not None else None
        return producer.weight.detach().to(dtype), bias

    def _batch_norm(self, x: torch.Tensor, fold: bool = True):
        """BN's step (the burn-in's, an empty window's): y, the batch's mean and biased variance, and
        whether it was folded into the running statistics (with ``fold=False``, a recomputation,
        into copies of them)."""
        running = (self.running_mean, self.running_var)
        if not fold:
            running = tuple(buffer.clone() for buffer in running)
        y, mean, invstd, folded = F.batch_norm_train(x, *self._affine(x), self.eps, self.backend, *running,
                                                     self.batch_weight())
        mean, invstd = mean.detach(), invstd.detach()  # (the autograd backend's are differentiable)
        return y, mean, invstd.reciprocal().square() - self.eps, folded

    def _derivatives(self, x: torch.Tensor, u: torch.Tensor, gradient: torch.Tensor | None):
        """This batch's d mu/dW ``(G, F)`` and d nu/dW ``(C, F)`` from torch's ops (:mod:`bnlab.functional`);
        ``gradient``: a conv's weight gradient from x, when the producer's hook took it."""
        producer = self.producer
        dnu = F.second_moment_derivative(x, u, producer, gradient)
        return F.mean_patches(u, producer), dnu.reshape(x.shape[1], -1)

    def _kernel_state(self, x: torch.Tensor) -> "F.CrossIterationViews | None":
        """The NumPy views the numba kernels take (:func:`bnlab.functional.cross_iteration_views`),
        or None when they cannot take this step (they take float32/64 CPU tensors, x channels-first,
        with ``backend="auto"``).

        Kept between steps and remade when a tensor behind them moved (``.to()``, ``pair()``,
        ``load_state_dict(assign=True)``, ``.data =``): the cached views hold the old tensors, so
        an equal address is the same memory. The producer weight's strides count too: a view of
        it assigned with ``.data =`` (transposed, say) can start at the same address.
        """
        if not (self.backend == "auto" and F.fused_act_supported(x) and x.is_contiguous()) or F.transformed():
            return None
        params, buffers, producer = self._parameters, self._buffers, self.producer
        tensors = (params.get("weight"), params.get("bias"), buffers["running_mean"], buffers["running_var"],
                   producer._parameters.get("weight"), producer._parameters.get("bias"),
                   *[buffers[name] for name in WINDOW_BUFFERS])
        weight = tensors[4]  # (None where computed: then no views are made, below)
        key = [t.data_ptr() if t is not None else 0 for t in tensors] + [weight.stride() if weight is not None else ()]
        cached = self.__dict__.get("_state")
        if cached is None or cached[0] != key:
            # The producer's weight or this layer's gamma made anew on each read or forward (pruned, say): no
            # view to keep. (Such a weight is no parameter of that name, so the key changed when it became one.)
            if F.computed_weight(producer) or F.computed_weight(self):
                self.__dict__["_state"] = None
                return None
            views = F.cross_iteration_views(*tensors[:4], producer, tensors[6:], self.compensate)
            cached = self.__dict__["_state"] = (key, views)
        return cached[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A BN checkpoint (torch's or bnlab's, no window: a pretrained backbone) loads with an empty
        # window at iteration 0, as a new layer starts: burn-in, then pooling.
        keys = {name: prefix + name for name in ("iteration", *WINDOW_BUFFERS)}
        if not any(key in state_dict for key in keys.values()):
            for name, key in keys.items():
                state_dict[key] = torch.zeros_like(getattr(self, name))
        derivatives = [prefix + "window_dmu", prefix + "window_dnu"]
        stored, valid = state_dict.get(derivatives[1]), state_dict.get(prefix + "window_valid")
        if stored is not None and valid is not None and (not self.compensate or stored.numel() == 0):
            if self.compensate and _any(valid):
                error_msgs.append(f"{prefix or type(self).__name__}: the checkpoint is naive CBN's (compensate=False): "
                                  "its window keeps no derivatives to compensate with; load it into compensate=False")
            else:  # derivatives this layer does not keep (naive), or none stored yet: not needed
                for key in derivatives:
                    state_dict[key] = torch.zeros_like(getattr(self, key[len(prefix):]))
        # Unpaired, the derivative buffers have no shape yet: take the checkpoint's (pair() checks it).
        for name in ("window_dmu", "window_dnu"):
            stored, own = state_dict.get(prefix + name), getattr(self, name)
            if self.producer is None and stored is not None and own.numel() == 0 and stored.shape != own.shape:
                setattr(self, name, torch.zeros(stored.shape, dtype=own.dtype, device=own.device))
        if valid is not None and valid.shape != self.window_valid.shape:
            error_msgs.append(f"{prefix or type(self).__name__}: the checkpoint's window holds {valid.shape[0]} past "
                              f"iterations (window={valid.shape[0] + 1}), this layer's window={self.window}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _derivatives_dtype(dtype: torch.dtype) -> torch.dtype:
        """The derivatives' dtype: the layer's, float32 at least."""
        return torch.float32 if dtype in F.LOW_PRECISION else dtype

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_state"] = None  # its views would keep the old tensors alive
        super()._apply(fn, *args, **kwargs)
        for name in ("window_dmu", "window_dnu"):  # model.half(), .to(torch.bfloat16): float32 at least, as
            buffer = self._buffers[name]  # the compensation's differences cancel in 8 or 11 bits
            self._buffers[name] = buffer.to(self._derivatives_dtype(buffer.dtype))
        for name in WINDOW_STATISTICS:  # model.float() too: float64 (WINDOW_STATISTICS)
            buffer = self._buffers[name]
            dtype = _statistics_dtype(buffer.device)
            if buffer.dtype != dtype:
                self._buffers[name] = buffer.to(dtype)
        return self

    def __getstate__(self):
        # copy.deepcopy and pickle: the kernels' views belong to this layer's tensors, not the copy's
        return {**super().__getstate__(), "_state": None, "_input": None}

    def _train_fused(self, views: "F.CrossIterationViews", x, u, gradient, pooling: bool,
                     slot: int) -> tuple[torch.Tensor, bool]:
        """One training step on the numba kernels (:mod:`bnlab.kernels.cpu_cbn`): the pooled
        normalization (an autograd function), the running statistics and the window's statistics,
        then (compensated, and the batch finite) the window's derivatives. ``gradient``: a conv's
        weight gradient from x, when the producer's hook took it (:meth:`_capture`)."""
        stats = np.zeros((5, x.shape[1]))  # (filled by the forward, row 4 but k; its own per call: backward reads it)
        y = FusedCrossIterationNormFunction.apply(x, self.weight, self.bias, self.eps, pooling, views.norm, stats)
        self._remember(stats[0], stats[1], ("fused", stats))
        folded = F.cross_iteration_commit_(views, stats, F.values_per_channel(x), self.batch_weight(), slot)
        if folded and self.compensate:
            F.cross_iteration_store_(views, slot, x, u, self.producer, gradient, self.__dict__["_moments"])
        return y, folded

    def _train_torch(self, x, u, gradient, pooling: bool, slot: int) -> tuple[torch.Tensor, bool]:
        """The same step as torch ops: any device and dtype (and the fused kernels' reference)."""
        filled = int(self.window_valid.sum()) if pooling else 0
        if filled > 0:
            past_mu, past_nu, n = self._past_statistics(filled)
            y, mu, var = self._pooled_norm(x, past_mu, past_nu, n + 1)
            self._remember(mu, var, ("pooled", past_mu, past_nu, n + 1))
            with torch.no_grad():
                folded = F.update_running_stats_(self.running_mean, self.running_var, mu, var,
                                                 F.values_per_channel(x), self.batch_weight())
        else:  # BN, whose kernel folds the batch into the running statistics too
            y, mu, var, folded = self._batch_norm(x)
            self._remember(mu, var, ("bn",))
        if folded:  # a non-finite batch never enters the window
            with torch.no_grad():
                mu = mu.to(self.window_mu.dtype)  # (float64: nu = sigma2 + mu^2 keeps sigma2's digits)
                self.window_mu[slot] = mu
                self.window_nu[slot] = var.to(mu.dtype) + mu * mu
                if self.compensate:
                    weight, bias = self._producer_weights()
                    self.window_dmu[slot], self.window_dnu[slot] = self._derivatives(x, u, gradient)
                    entry = slice(slot, slot + 1)  # the stored copies: contiguous, whatever dnu's layout
                    mu_w, nu_w = F.compensation_terms(self.window_dmu[entry], self.window_dnu[entry], weight)
                    self.window_dmu_w[slot], self.window_dnu_w[slot] = mu_w[0], nu_w[0]
                    self.window_bias[slot] = bias if bias is not None else 0.0
                self.window_valid[slot] = True
        return y, folded


class CrossIterationBatchNorm1d(CrossIterationBatchNorm):
    """:class:`CrossIterationBatchNorm` after a Linear layer: ``(N, C)`` inputs."""

    ranks = (2,)


class CrossIterationBatchNorm2d(CrossIterationBatchNorm):
    """:class:`CrossIterationBatchNorm` after a Conv2d layer: ``(N, C, H, W)`` inputs."""

    ranks = (4,)


def _keep_windows_local(model: nn.Module, layers: list[str]) -> None:
    """Have DistributedDataParallel leave these layers' windows out of its buffer broadcast.

    DDP (``broadcast_buffers=True``, its default) copies rank 0's buffers to every rank before each
    forward. A window is per-rank state, as in the paper and the official code: broadcast, every
    rank would pool rank 0's past statistics with its own batch's, and the window's derivatives
    (``window - 1`` times the producer's weights) would cross the network every step. The
    running statistics are broadcast as BN's are. DDP reads the names from the module it wraps.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = [f"{layer}.{buffer}" for layer in layers for buffer in WINDOW_BUFFERS]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ignored + [name for name in names if name not in ignored])


PAIRED_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, BatchNorm1d, BatchNorm2d)  # what cross_iteration converts


def _to_pair(module: nn.Module) -> bool:
    """What :func:`cross_iteration` pairs with a producer: the batch norms it converts, and
    cross-iteration layers not paired yet (a model built with ``norm_layer=`` a cross-iteration
    class, as torchvision's and timm's constructors take it), which keep their own settings."""
    unpaired = isinstance(module, CrossIterationBatchNorm) and module.producer is None
    return type(module) in PAIRED_BATCH_NORMS or unpaired


UNCOMPENSATED = ", so its statistics cannot be compensated"


def _sources_traced(model: nn.Module):
    """For each call of a BatchNorm1d/2d in ``model``, from its torch.fx graph: (its name, the Linear
    or Conv2d whose output it normalizes, or None and why there is none)."""
    try:
        graph = trace_graph(model)
    except Exception as err:  # fx raises many kinds
        raise ValueError(f"cross_iteration: could not trace the model ({err}); pass example_inputs (one forward "
                         "pass finds the pairs instead), convert a part that torch.fx can trace (a detector's "
                         "backbone: cross_iteration(model.backbone); then wrap the model with "
                         "DistributedDataParallel(..., broadcast_buffers=False), which reads the windows to leave "
                         "out from the model it wraps only), or pair layers by hand with "
                         "CrossIterationBatchNorm2d(...).pair(conv)") from err
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "call_module" and _to_pair(modules[node.target]):
            source = node.args[0]
            producer = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
            what = source.target if getattr(source, "op", None) == "call_module" else f"{source.op} {source.target}"
            yield (node.target, producer if isinstance(producer, (nn.Linear, nn.Conv2d)) else None,
                   f"its input comes from {what!r}, not from a Linear or Conv2d layer{UNCOMPENSATED}")


def _sources_run(model: nn.Module, example_inputs: tuple):
    """:func:`_sources_traced`'s answer from one forward pass on ``example_inputs`` instead (eval mode,
    no gradients, every module's mode restored): hooks note which Linear or Conv2d output each
    BatchNorm1d/2d receives, unchanged since (the same tensor, not written in place)."""
    from bnlab.modules.model import evaluating  # (model.py builds on this module)

    modules = dict(model.named_modules())
    outputs, calls = [], []  # (producer name, its output, the output's version then); (BN name, its input, version)
    handles = []
    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(
                lambda module, args, output, name=name: outputs.append((name, output, output._version))))
        elif _to_pair(module):
            handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: calls.append((name, args[0], args[0]._version))))
    try:
        with evaluating(model):
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, x, version in calls:
        source = next((record for record in reversed(outputs) if record[1] is x), None)
        if source is None:
            yield name, None, f"its input is not a Linear or Conv2d layer's output{UNCOMPENSATED}"
        elif source[2] != version:
            yield name, None, (f"its input is {source[0]!r}'s output, changed in place since (an in-place "
                               f"activation?){UNCOMPENSATED}")
        else:
            yield name, modules[source[0]], ""
    ran = {name for name, _, _ in calls}
    for name, module in modules.items():
        if _to_pair(module) and name not in ran:
            yield name, None, "the example inputs did not run it, so what feeds it is unknown"


def cross_iteration(model: nn.Module, window: int = 4, burn_in: int = 0, compensate: bool = True, *,
                    strict: bool = True, example_inputs=None) -> nn.Module:
    """Convert every BN of ``model`` whose input is a Linear or Conv2d output into cross-iteration BN.

    Finds the pairs by tracing the model with torch.fx, or, given ``example_inputs`` (a tensor or a
    tuple of the forward's arguments: a small batch), by running it once on them in eval mode
    without gradients (a model with control flow, which fx cannot trace: a detector); the BN state
    carries over. A BN fed by anything else (an addition, an activation, a function; a layer
    shared by several inputs) is refused with its name, since its statistics could not be
    compensated, and so is a BN without running statistics (``track_running_stats=False``: it
    normalizes with batch statistics in inference too, which cross-iteration BN does not); with
    ``strict=False`` such layers stay BN instead, named in a warning (a pre-activation ResNet
    normalizes sums), and the others are converted. Cross-iteration layers not paired yet (a model
    built with ``norm_layer=partial(CrossIterationBatchNorm2d, window=4)``) are paired with their
    producers as they are (their own settings; one without such a producer is refused, strict or
    not, as it could not train). Other batch-norm layers (synchronized, ghost, Batch Renorm, BN
    fused with its activation, 3-D) are left as they are, and a warning names them.

    Under DistributedDataParallel each rank keeps its own window, as in the paper: the returned
    model tells DDP to leave the windows out of its buffer broadcast (wrap this model, not a
    parent of it; for a converted part of a model, such as a detector's backbone, or layers paired
    by hand, ``DistributedDataParallel(..., broadcast_buffers=False)``).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(8 * 26 * 26, 10, bias=False), nn.BatchNorm1d(10))
        >>> net = cross_iteration(net, window=4, burn_in=1000)  # plain BN for 1000 steps, then pooled
        >>> type(net[1]).__name__, type(net[5]).__name__
        ('CrossIterationBatchNorm2d', 'CrossIterationBatchNorm1d')
    """
    if example_inputs is None:
        sources = list(_sources_traced(model))
    else:
        sources = list(_sources_run(model, forward_arguments(example_inputs)))
    modules = dict(model.named_modules())
    producers, refused = {}, {}  # BN name -> its producer; BN name -> why it cannot become cross-iteration BN
    for name, producer, why in sources:
        if name in refused:
            continue
        if not modules[name].track_running_stats:
            refused[name] = ("it keeps no running statistics (track_running_stats=False), so it normalizes with "
                             "batch statistics in inference; cross-iteration BN uses running statistics there (give "
                             "it running statistics first)")
        elif producer is None:
            refused[name] = why
        elif producers.setdefault(name, producer) is not producer:
            refused[name] = "it normalizes the outputs of several layers (a layer shared by several inputs)"
    pairs = [(name, producer) for name, producer in producers.items() if name not in refused]
    unpaired = [name for name in refused if isinstance(modules[name], CrossIterationBatchNorm)]
    if unpaired or (refused and strict):
        name = (unpaired or list(refused))[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        advice = ("a cross-iteration layer trains only after a Linear or Conv2d: put it straight after one, or make "
                  "it BN" if unpaired else "Pass strict=False to keep such layers as BN and convert the others, or "
                  "pair layers by hand")
        raise ValueError(f"cross_iteration: cannot {'pair' if unpaired else 'convert'} {name!r}{more}: "
                         f"{refused[name]}. {advice[0].upper()}{advice[1:]}")
    if refused:
        warnings.warn("cross_iteration: kept as BN (strict=False): " + "; ".join(
            f"{name!r}: {why}" for name, why in refused.items()), stacklevel=_caller_level())
    warn_left(model, lambda m: type(m) in PAIRED_BATCH_NORMS or isinstance(m, CrossIterationBatchNorm),
              "cross_iteration",
              "only BatchNorm1d/2d layers (torch's or bnlab's) after a Linear or Conv2d become cross-iteration BN")
    for name, producer in pairs:
        old = modules[name]
        if isinstance(old, CrossIterationBatchNorm):  # (built unpaired: paired as it is)
            old.pair(producer)
            continue
        cls = CrossIterationBatchNorm2d if isinstance(producer, nn.Conv2d) else CrossIterationBatchNorm1d
        ref = old.weight if old.affine else old.running_mean
        new = cls(old.num_features, window, burn_in, compensate, old.eps, momentum_argument(old), old.affine,
                  device=ref.device, dtype=ref.dtype).pair(producer)
        new = carry_state(old, new)  # (a BN state: the window starts empty)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    _keep_windows_local(model, [name for name, _ in pairs])
    return name_layers(model)
