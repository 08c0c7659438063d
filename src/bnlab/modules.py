"""nn.Module layers of Batch Normalization: parameters, buffers, train/eval, input checks.

``BatchNorm1d/2d/3d`` are one class, :class:`BatchNorm`, with a rank check. They take
``torch.nn.BatchNorm*``'s constructor arguments and state_dict keys (a torch checkpoint loads into
bnlab and back) and add what users of torch's layers ask for: the running-statistics convention as
an explicit argument, a guard against non-finite batches, errors that say what to do, population
statistics by the paper's Algorithm 2 (:func:`recalibrate`), and :func:`convert` for whole models.
"""

from __future__ import annotations

import warnings
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch import nn

from bnlab import functional as F
from bnlab.autograd import CrossIterationNormFunction, FusedCrossIterationNormFunction

STATS = ("ema", "cumulative")
# Cross-iteration BN's window, in the order the kernels of bnlab.kernels.cpu_cbn take it
WINDOW_BUFFERS = ("window_mu", "window_nu", "window_bias", "window_dmu", "window_dnu", "window_dmu_w", "window_dnu_w",
                  "window_valid")


class BatchNorm(nn.Module):
    """Batch Normalization (Ioffe & Szegedy 2015) over dimension 1 of an ``(N, C, *)`` input.

    Training: y = weight * (x - mu_B) / sqrt(sigma2_B + eps) + bias, with the batch's mean mu_B and
    biased variance sigma2_B per channel over N * prod(spatial) = m values (Algorithm 1). Then the
    running statistics fold the batch in, with the *unbiased* variance m/(m-1) * sigma2_B:

    - ``stats="ema"`` (default, PyTorch's convention): r <- (1 - momentum) * r + momentum * stat,
      ``momentum`` being the weight of the new batch (0.1; Keras' momentum=0.99 is 0.01 here);
    - ``stats="cumulative"`` (or ``momentum=None``): r <- r + (stat - r) / t after the t-th batch,
      the equal-weight average of every batch seen, as in Algorithm 2.

    A batch whose statistics are not finite is not folded in (a warning names the layer), and
    ``num_batches_tracked`` counts the batches that were. Inference: the running statistics
    (Algorithm 2's affine transform); with ``track_running_stats=False`` batch statistics are used
    in both modes, as in torch.

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
        if stats is None:
            stats = "cumulative" if momentum is None else "ema"
        if stats not in STATS:
            raise ValueError(f"stats must be one of {STATS}, got {stats!r}")
        if stats == "ema" and not (momentum is not None and 0.0 <= momentum <= 1.0):
            raise ValueError(f"stats='ema' needs 0 <= momentum <= 1 (weight of the new batch), got {momentum}")
        if backend not in F.BACKENDS:
            raise ValueError(f"backend must be one of {F.BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.stats = stats
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

    def _check_input(self, x: torch.Tensor) -> None:
        if self.ranks and x.dim() not in self.ranks:
            expected = " or ".join(f"{r}D" for r in self.ranks)
            raise ValueError(
                f"{type(self).__name__}: expected {expected} input, got {x.dim()}D input of shape "
                f"{tuple(x.shape)}"
            )
        F.check_input(x, self.num_features, self.training, self._label)

    def batch_weight(self) -> float:
        """The new batch's weight in the running average: momentum, or 1/t for the t-th batch."""
        if self.stats == "cumulative":
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training and self.track_running_stats:
            return self._inference(x)
        tracking = self.training and self.track_running_stats
        y, folded = self._train(x, tracking)
        if tracking:
            self.count_batch_(folded)
        return y

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """Algorithm 2: the running statistics. Subclasses change what follows or precedes it."""
        return F.batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps,
                                 self.backend)

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        """Batch statistics; folds the batch into the running buffers when ``tracking``.
        Returns the output and whether the batch was folded in. Subclasses change the statistics."""
        y, _, _, folded = F.batch_norm_train(
            x, self.weight, self.bias, self.eps, self.backend,
            self.running_mean if tracking else None, self.running_var if tracking else None, self.batch_weight(),
        )
        return y, folded

    def count_batch_(self, folded: bool) -> None:
        """Count a batch folded into the running statistics, or warn that it was skipped."""
        if folded:
            self.num_batches_tracked.add_(1)
        else:
            warnings.warn(
                f"{self._label()}: non-finite batch statistics (NaN or inf in the input); this batch "
                "was not folded into the running statistics",
                RuntimeWarning,
                stacklevel=3,
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from torch < 0.4.1 have no num_batches_tracked; start it at 0 as torch does.
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
    ``"sigmoid"`` or ``"identity"``. The state_dict keys are BN's, so a BN checkpoint loads into it. Training with ReLU or leaky
    ReLU on large float32/float64 CPU tensors runs bnlab's fused kernels (two passes over the data
    forward, three backward, against five and eight for BN then the activation; see
    benchmarks/RESULTS.md); SiLU and sigmoid, whose exp the kernels compute one value at a time,
    run BN then torch's activation unless ``backend="fused"``; CUDA tensors run the Triton kernels.
    Inference: the running statistics, then ``act``.

    Example:
        >>> layer = BatchNormAct2d(64, act="relu")
        >>> y = layer(torch.randn(8, 64, 32, 32))   # == relu(BatchNorm2d(64)(x))
    """

    def __init__(self, num_features: int, act: str = "relu", negative_slope: float = 0.01, **kwargs):
        super().__init__(num_features, **kwargs)
        if act not in F.ACTIVATIONS:
            raise ValueError(f"act must be one of {F.ACTIVATIONS}, got {act!r}")
        self.act = act
        self.negative_slope = negative_slope

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act!r}"

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        return F.activation(super()._inference(x), self.act, self.negative_slope)

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


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) over dimension 1 of an ``(N, C, *)`` input.

    Training: y = weight * ((x - mu_B) / sigma_B * r + d) + bias with sigma_B = sqrt(sigma2_B + eps),
    r = clip(sigma_B / sigma, 1/r_max_t, r_max_t) and d = clip((mu_B - mu) / sigma, -d_max_t, d_max_t)
    held constant in backprop, mu and sigma the moving mean and standard deviation (buffers
    ``running_mean``, ``running_std``; rate ``momentum``, the new batch's weight). The limits follow
    the paper's schedule in ``num_batches_tracked``: (1, 0), plain BN, for ``warmup`` steps, then
    relaxed linearly to ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps``. With
    r_max=1 and d_max=0 it is BN. Inference: y = weight * (x - mu) / sigma + bias.

    Example:
        >>> layer = BatchRenorm2d(64, r_max=3.0, d_max=5.0)   # for micro-batches of 4, say
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, device=None, dtype=None, *,
                 r_max=3.0, d_max=5.0, warmup=5_000, r_max_steps=40_000, d_max_steps=25_000):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        del self.running_var
        self.register_buffer("running_std", torch.ones(num_features, device=device, dtype=dtype))
        self.r_max, self.d_max = r_max, d_max
        self.warmup, self.r_max_steps, self.d_max_steps = warmup, r_max_steps, d_max_steps

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1)
        self.num_batches_tracked.zero_()

    def limits(self) -> tuple[float, float]:
        """(r_max, d_max) at the current step."""
        return F.renorm_limits(int(self.num_batches_tracked), self.r_max, self.d_max,
                               self.warmup, self.r_max_steps, self.d_max_steps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, warmup={self.warmup}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if not self.training:
            return F.batch_renorm_eval(x, self.weight, self.bias, self.running_mean, self.running_std)
        r_max, d_max = self.limits()
        y, folded = F.batch_renorm_train(x, self.weight, self.bias, self.running_mean, self.running_std,
                                         r_max, d_max, self.eps, self.momentum)
        self.count_batch_(folded)
        return y


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C)`` or ``(N, C, L)`` inputs."""

    ranks = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C, H, W)`` inputs."""

    ranks = (4,)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C, D, H, W)`` inputs."""

    ranks = (5,)


class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual sub-batches in training.

    Training splits the batch into consecutive chunks of ``virtual_batch_size`` examples and
    normalizes each with its own statistics; the running statistics fold in, once per forward,
    the average of the chunks' means and of their unbiased variances. Inference uses the running
    statistics like BN (never virtual batches: the bug some implementations had). BN's
    state_dict keys.

    Example:
        >>> layer = GhostBatchNorm2d(64, virtual_batch_size=32)   # batch 256 = 8 ghost batches
    """

    def __init__(self, num_features, virtual_batch_size=32, **kwargs):
        super().__init__(num_features, **kwargs)
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be at least 1, got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        y, mean, var_unbiased = F.ghost_batch_norm_train(x, self.weight, self.bias, self.virtual_batch_size,
                                                         self.eps, self.backend)
        folded = tracking and F.update_running_stats_(self.running_mean, self.running_var, mean, var_unbiased,
                                                      None, self.batch_weight())
        return y, folded


class GhostBatchNorm1d(GhostBatchNorm):
    """:class:`GhostBatchNorm` over ``(N, C)`` or ``(N, C, L)`` inputs."""

    ranks = (2, 3)


class GhostBatchNorm2d(GhostBatchNorm):
    """:class:`GhostBatchNorm` over ``(N, C, H, W)`` inputs."""

    ranks = (4,)


class _KernelState(NamedTuple):
    """What :mod:`bnlab.kernels.cpu_cbn` takes besides the batch, as NumPy views of a layer's tensors."""

    kernels: object  # the module, imported when first needed
    norm: tuple  # FusedCrossIterationNormFunction's: the kernels, gamma, beta, the window as pooled_forward reads it
    running: tuple  # running_mean, running_var
    entry: tuple  # commit's window arrays
    derivatives: tuple  # store_conv's and store_linear's
    geometry: tuple  # a conv producer's kernel size, stride, padding, dilation, as store_conv takes them


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

    Gradients reach the weights through the current iteration's 1/k share of the statistics only,
    so the layer is not invariant to its producer's weight scale as BN is: started early at a high
    learning rate, the weights and gammas grow and accuracy suffers (the small-batch experiment,
    README). Start pooling late (the official detection config: after 8 of 12 epochs; the
    experiment: half the steps) or use a short window.

    The window (statistics, their weight derivatives and the derivatives' products with the
    weights they were taken at, the biases, which entries are filled) and the iteration count are
    buffers: a checkpoint resumes CBN
    exactly and ``.to()`` moves them. The layer must be paired with its producer before its first
    training forward or ``load_state_dict``: ``layer.pair(conv)``, or ``bnlab.cross_iteration(model)``
    for a whole model.

    Speed: d mu/dW is the mean input patch and d nu/dW one weight-gradient reduction (torch's
    kernel for a conv, called from the producer's forward hook), never extra autograd passes.
    With ``backend="auto"`` a training step on float32/64 CPU tensors runs on the numba kernels
    of :mod:`bnlab.kernels.cpu_cbn` (moments, compensation, pooling and normalization in one call;
    the running statistics and the window in two more); elsewhere, or with ``backend="native"``,
    on torch ops (any device; the tests hold the two paths to the same steps). The burn-in's
    iterations before the last ``window - 1`` are plain BN and store nothing.

    Example:
        >>> conv, cbn = nn.Conv2d(3, 16, 3, bias=False), CrossIterationBatchNorm2d(16, window=4, burn_in=100)
        >>> cbn.pair(conv)
        >>> y = cbn(conv(torch.randn(4, 3, 32, 32)))
    """

    def __init__(self, num_features, window: int = 4, burn_in: int = 0, compensate: bool = True, eps=1e-5,
                 momentum=0.1, affine=True, device=None, dtype=None, *, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, backend=backend)
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window, self.burn_in, self.compensate = window, burn_in, compensate
        factory = {"device": device, "dtype": dtype}
        past = window - 1
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("window_valid", torch.zeros(past, dtype=torch.bool, device=device))
        self.register_buffer("window_mu", torch.zeros(past, num_features, **factory))
        self.register_buffer("window_nu", torch.zeros(past, num_features, **factory))
        self.register_buffer("window_bias", torch.zeros(past, num_features, **factory))
        self.register_buffer("window_dmu_w", torch.zeros(past, num_features, **factory))  # <d mu/d W, W> then
        self.register_buffer("window_dnu_w", torch.zeros(past, num_features, **factory))  # <d nu/d W, W> then
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
                setattr(self, name, torch.zeros(shape, dtype=self.window_mu.dtype, device=self.window_mu.device))
        self.__dict__["_producer"] = producer
        self.__dict__["_hook"] = producer.register_forward_hook(self._capture)
        return self

    def _capture(self, module, args, output):
        """The producer's forward hook: keep its input for the derivatives of this iteration's
        statistics. A conv's weight gradient from its output (d nu/dW up to 2/m) is taken here,
        straight after the conv, while its input and output are still in cache: the call costs
        less than after the normalization (``benchmarks/RESULTS.md``)."""
        if not self.training:
            self.__dict__["_input"] = None
            return
        u = args[0].detach()
        gradient = None
        if self.compensate and isinstance(module, nn.Conv2d) and self._stores(int(self.iteration)):
            gradient = F.conv_weight_gradient(output, u, module)
        self.__dict__["_input"] = (u, output, gradient)

    def extra_repr(self) -> str:
        return f"{self.num_features}, window={self.window}, burn_in={self.burn_in}, compensate={self.compensate}"

    def _past_statistics(self, filled: int):
        """The window's valid entries, compensated to the producer's current weights (or raw, when
        naive), clipped by nu >= mu^2: their sums ``(C,)`` and how many there are."""
        # The filled entries are a prefix unless a non-finite batch left a hole: slice, else mask.
        past = slice(0, filled) if bool(self.window_valid[:filled].all()) else self.window_valid
        mu, nu = self.window_mu[past], self.window_nu[past]
        if self.compensate:
            producer = self.producer
            mu, nu = F.compensated_window(
                mu, nu, self.window_dmu[past], self.window_dnu[past], self.window_dmu_w[past], self.window_dnu_w[past],
                self.window_bias[past], producer.weight.detach(),
                producer.bias.detach() if producer.bias is not None else None)
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

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        producer, captured = self.producer, self.__dict__["_input"]
        self.__dict__["_input"] = None
        if producer is None:
            raise RuntimeError(f"{self._label()}: not paired with its producer; call layer.pair(conv_or_linear) "
                               "or bnlab.cross_iteration(model) first")
        if captured is None or captured[0].shape[0] != x.shape[0]:
            raise RuntimeError(f"{self._label()}: its producer did not run on this batch just before it; the "
                               "input must be the paired layer's output")
        u, output, gradient = captured
        if output is not x:  # (something between the producer and this layer: take x's own)
            gradient = None
        iteration = int(self.iteration)
        if not self._stores(iteration):
            y, _, _, folded = F.batch_norm_train(x, self.weight, self.bias, self.eps, self.backend, self.running_mean,
                                                 self.running_var, self.batch_weight())
        else:
            pooling, slot = iteration >= self.burn_in, iteration % (self.window - 1)
            state = self._kernel_state(x)
            if state is not None:
                y, folded = self._train_fused(state, x, u, gradient, pooling, slot)
            else:
                y, folded = self._train_torch(x, u, gradient, pooling, slot)
        if not self._recalibrating:
            self.iteration.add_(1)
        return y, folded

    def _derivatives(self, x: torch.Tensor, u: torch.Tensor, gradient: torch.Tensor | None):
        """This batch's d mu/dW ``(G, F)`` and d nu/dW ``(C, F)`` from torch's ops (:mod:`bnlab.functional`);
        ``gradient``: a conv's weight gradient from x, when the producer's hook took it."""
        producer = self.producer
        dnu = F.second_moment_derivative(x, u, producer, gradient)
        return F.mean_patches(u, producer), dnu.reshape(x.shape[1], -1)

    def _kernel_state(self, x: torch.Tensor) -> "_KernelState | None":
        """The NumPy views the numba kernels take, or None when they cannot take this step (they
        take float32/64 CPU tensors, x channels-first, with ``backend="auto"``).

        Kept between steps and remade when a tensor behind them moved (``.to()``, ``pair()``,
        ``load_state_dict(assign=True)``, ``.data =``): the cached views hold the old tensors, so
        an equal address is the same memory.
        """
        if not (self.backend == "auto" and F.fused_act_supported(x) and x.is_contiguous()):
            return None
        params, buffers, producer = self._parameters, self._buffers, self.producer
        tensors = (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                   producer._parameters["weight"], producer._parameters["bias"],
                   *[buffers[name] for name in WINDOW_BUFFERS])
        key = [t.data_ptr() if t is not None else 0 for t in tensors]
        cached = self.__dict__.get("_state")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_state"] = (key, self._make_kernel_state(tensors))
        return cached[1]

    def _make_kernel_state(self, tensors) -> "_KernelState | None":
        if not all(t is None or t.is_cpu for t in tensors):
            return None
        if not all(t is None or t.dtype in F.FUSED_DTYPES for t in tensors[:7]):  # (not the valid flags)
            return None
        producer = self.producer
        if isinstance(producer, nn.Conv2d) and (producer.padding_mode != "zeros" or isinstance(producer.padding, str)):
            return None  # the torch path says what it does not support
        from bnlab.kernels import cpu_cbn

        c = self.num_features
        gamma, beta, mean, var, weight, bias, *window = (t.detach() if t is not None else None for t in tensors)
        if gamma is None:
            gamma, beta = torch.ones(c, dtype=mean.dtype), torch.zeros(c, dtype=mean.dtype)
        if bias is None:
            bias = torch.zeros(c, dtype=weight.dtype)
        if not self.compensate:  # (P, 0) placeholders, shaped as the kernels index them
            window[3], window[4] = (t.view(self.window - 1, 1, 0) for t in window[3:5])
        w_mu, w_nu, w_bias, w_dmu, w_dnu, w_dmu_w, w_dnu_w, valid = (t.numpy() for t in window)
        weight, bias = weight.reshape(c, -1).numpy(), bias.numpy()
        return _KernelState(
            kernels=cpu_cbn,
            norm=(cpu_cbn, gamma.numpy(), beta.numpy(),
                  (weight, bias, w_mu, w_nu, w_bias, w_dmu, w_dnu, w_dmu_w, w_dnu_w, valid, self.compensate)),
            running=(mean.numpy(), var.numpy()),
            entry=(bias, w_mu, w_nu, w_bias, w_dmu_w, w_dnu_w, valid, self.compensate),
            derivatives=(w_dmu, w_dnu),
            geometry=(*producer.kernel_size, *producer.stride, *producer.padding, *producer.dilation)
            if isinstance(producer, nn.Conv2d) else (),
        )

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_state"] = None  # its views would keep the old tensors alive
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # copy.deepcopy and pickle: the kernels' views belong to this layer's tensors, not the copy's
        return {**super().__getstate__(), "_state": None, "_input": None}

    def _train_fused(self, state: "_KernelState", x, u, gradient, pooling: bool,
                     slot: int) -> tuple[torch.Tensor, bool]:
        """One training step on the numba kernels (:mod:`bnlab.kernels.cpu_cbn`): the pooled
        normalization (an autograd function), the running statistics and the window's statistics,
        then (compensated, and the batch finite) the window's derivatives. ``gradient``: a conv's
        weight gradient from x, when the producer's hook took it (:meth:`_capture`)."""
        kernels = state.kernels
        stats = np.empty((4, x.shape[1]))  # (filled by the forward; its own per call: backward reads it)
        y = FusedCrossIterationNormFunction.apply(x, self.weight, self.bias, self.eps, pooling, state.norm, stats)
        m = F.values_per_channel(x)
        folded = kernels.commit(stats, m, *state.running, self.batch_weight(), slot, *state.entry)
        if folded and self.compensate:
            producer = self.producer
            if isinstance(producer, nn.Linear):
                kernels.store_linear(slot, x.detach().numpy(), u.contiguous().numpy(), *state.derivatives)
            else:  # d nu/dW on torch's weight-gradient kernel, scaled by 2/m in the window
                dnu = gradient if gradient is not None else F.conv_weight_gradient(x, u, producer)
                kernels.store_conv(slot, u.contiguous().numpy(), *state.geometry, dnu.view(x.shape[1], -1).numpy(),
                                   2.0 / m, *state.derivatives)
        return y, folded

    def _train_torch(self, x, u, gradient, pooling: bool, slot: int) -> tuple[torch.Tensor, bool]:
        """The same step as torch ops: any device and dtype (and the fused kernels' reference)."""
        filled = int(self.window_valid.sum()) if pooling else 0
        if filled > 0:
            past_mu, past_nu, n = self._past_statistics(filled)
            y, mu, var = CrossIterationNormFunction.apply(x, self.weight, self.bias, past_mu.to(x.dtype),
                                                          past_nu.to(x.dtype), n + 1, self.eps)
            with torch.no_grad():
                folded = F.update_running_stats_(self.running_mean, self.running_var, mu, var,
                                                 F.values_per_channel(x), self.batch_weight())
        else:  # BN, whose kernel folds the batch into the running statistics too
            y, mu, invstd, folded = F.batch_norm_train(x, self.weight, self.bias, self.eps, self.backend,
                                                       self.running_mean, self.running_var, self.batch_weight())
            var = invstd.detach().reciprocal().square() - self.eps  # the batch's, as BN computed it
        if folded:  # a non-finite batch never enters the window
            with torch.no_grad():
                self.window_mu[slot] = mu
                self.window_nu[slot] = var + mu * mu
                if self.compensate:
                    producer = self.producer
                    self.window_dmu[slot], self.window_dnu[slot] = self._derivatives(x, u, gradient)
                    entry = slice(slot, slot + 1)  # the stored copies: contiguous, whatever dnu's layout
                    mu_w, nu_w = F.compensation_terms(self.window_dmu[entry], self.window_dnu[entry],
                                                      producer.weight.detach())
                    self.window_dmu_w[slot], self.window_dnu_w[slot] = mu_w[0], nu_w[0]
                    self.window_bias[slot] = producer.bias.detach() if producer.bias is not None else 0.0
                self.window_valid[slot] = True
        return y, folded


class CrossIterationBatchNorm1d(CrossIterationBatchNorm):
    """:class:`CrossIterationBatchNorm` after a Linear layer: ``(N, C)`` inputs."""

    ranks = (2,)


class CrossIterationBatchNorm2d(CrossIterationBatchNorm):
    """:class:`CrossIterationBatchNorm` after a Conv2d layer: ``(N, C, H, W)`` inputs."""

    ranks = (4,)


def cross_iteration(model: nn.Module, window: int = 4, burn_in: int = 0, compensate: bool = True) -> nn.Module:
    """Convert every BN of ``model`` whose input is a Linear or Conv2d output into cross-iteration BN.

    Finds the pairs by tracing the model with torch.fx; the BN state carries over. A BN fed by
    anything else (an addition, an activation, a function) is refused with its name, since its
    statistics could not be compensated.
    """
    import torch.fx

    plain = (nn.BatchNorm1d, nn.BatchNorm2d, BatchNorm1d, BatchNorm2d)
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):  # bnlab's layers are leaves, like torch.nn's
            return isinstance(module, BatchNorm) or super().is_leaf_module(module, name)

    try:
        graph = Tracer().trace(model)
    except Exception as err:  # fx raises many kinds
        raise ValueError(f"cross_iteration: could not trace the model ({err}); pair layers by hand with "
                         "CrossIterationBatchNorm2d(...).pair(conv)") from err
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in plain:
            continue
        source = node.args[0]
        producer = modules.get(source.target) if getattr(source, "op", None) == "call_module" else None
        if not isinstance(producer, (nn.Linear, nn.Conv2d)):
            what = source.target if getattr(source, "op", None) == "call_module" else f"{source.op} {source.target}"
            raise ValueError(f"cross_iteration: the input of {node.target!r} comes from {what!r}, not from a Linear "
                             "or Conv2d layer, so its statistics cannot be compensated; keep it as BN")
        pairs.append((node.target, producer))
    for name, producer in pairs:
        old = modules[name]
        cls = CrossIterationBatchNorm2d if isinstance(producer, nn.Conv2d) else CrossIterationBatchNorm1d
        ref = old.weight if old.affine else old.running_mean
        new = cls(old.num_features, window, burn_in, compensate, old.eps, old.momentum if old.momentum is not None
                  else 0.1, old.affine, device=ref.device, dtype=ref.dtype).pair(producer)
        new.load_state_dict(old.state_dict(), strict=False)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new.train(old.training))
    return name_layers(model)


BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, BatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """True for bnlab's and torch.nn's batch-normalization layers."""
    return isinstance(module, BATCH_NORM_TYPES)


def name_layers(model: nn.Module) -> nn.Module:
    """Give every bnlab layer its qualified name in ``model``, so its warnings say which layer."""
    for name, module in model.named_modules():
        if isinstance(module, BatchNorm):
            module.name = name or type(module).__name__
    return model


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable, forward=None) -> nn.Module:
    """Ioffe & Szegedy 2015, Algorithm 2: population statistics for every BN layer of ``model``.

    Runs the batches through the training-mode network (every BN layer normalizing with its batch
    statistics, cross-iteration BN too, whose window and iteration count are left alone; every
    other module in eval mode, so dropout is off) and sets each layer's running statistics to

        E[x] = mean over batches of mu_B,   Var[x] = mean over batches of m/(m-1) * sigma2_B,

    where m is the number of values per channel in that batch (the paper's m/(m-1) E_B[sigma2_B]
    when every batch has the same size). Parameters, ``num_batches_tracked``, train/eval modes and
    all other state are left as they were.

    Args:
        model: a module holding bnlab or torch.nn batch-norm layers.
        batches: an iterable of inputs; a tuple or list is taken as ``(input, ...)``.
        forward: optional ``forward(model, batch)``; by default ``model(batch[0] or batch)``.

    Example:
        >>> recalibrate(net, (x for x, _ in train_loader))
    """
    layers = [m for m in model.modules()
              if is_batch_norm(m) and m.track_running_stats and getattr(m, "running_var", None) is not None]
    modes = {m: m.training for m in model.modules()}
    saved = {
        layer: (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone())
        for layer in layers
    }
    sums = {layer: [0.0, 0.0, 0] for layer in layers}

    def record(layer, args):
        x = args[0].detach().double()
        mean, var_biased = F.batch_stats(x)
        m = F.values_per_channel(x)
        if m < 2:
            raise ValueError(f"recalibrate: a batch has {m} value(s) per channel; Algorithm 2 needs m >= 2")
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
        for module, mode in modes.items():
            module.train(mode)
        for layer, (mean, var, count) in saved.items():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(count)
    for layer, (sum_mean, sum_var, n) in sums.items():
        if n == 0:
            raise ValueError("recalibrate: no batch reached a batch-norm layer; pass at least one batch")
        layer.running_mean.copy_(sum_mean / n)
        layer.running_var.copy_(sum_var / n)
    return model


TORCH_TO_BNLAB = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert(model: nn.Module, **kwargs) -> nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` for bnlab's, keeping its state.

    Parameters, buffers, device, dtype, requires_grad and train/eval mode carry over; ``kwargs``
    (``stats=``, ``backend=``) go to the new layers. Returns the model (a new layer when ``model``
    itself is a batch-norm layer).

    Example:
        >>> net = convert(torchvision.models.resnet18())
    """
    new = _converted(model, kwargs)
    if new is not None:
        return name_layers(new)
    for name, child in model.named_children():
        setattr(model, name, convert(child, **kwargs))
    return name_layers(model)


def _converted(module: nn.Module, kwargs) -> nn.Module | None:
    cls = TORCH_TO_BNLAB.get(type(module))
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
