"""Synchronized Batch Normalization over a torch.distributed process group, any backend.

PyTorch's SyncBatchNorm runs only on CUDA tensors; this one runs wherever the process group does,
gloo on the CPU included. The statistics are those of the union of every rank's batch:

    forward:  each rank sends (n_r, mean_r, M2_r) per channel (one all_gather); all combine them
              with Chan et al.'s parallel formula: n = sum n_r, mean = sum n_r mean_r / n,
              M2 = sum (M2_r + n_r (mean_r - mean)^2), sigma2_B = M2 / n  (stable, any sizes,
              an empty batch on a rank included);
    backward: one all_reduce of (sum dy, sum dy * x_hat) per channel, then Algorithm 1's backward
              with the global sums: dx = gamma * invstd / n * (n dy - sum dy - x_hat sum dy x_hat).

dgamma and dbeta are each rank's own part, as in torch (DistributedDataParallel sums or averages
the parameters' gradients across ranks). Under ``backward(create_graph=True)`` (a gradient
penalty) the backward is autograd's through the forward written with two differentiable
all-reduces instead, so it has a graph; every rank must take it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bnlab import functional as F
from bnlab.autograd import gradient_graph, graph_backward
from bnlab.modules import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, name_layers
from bnlab.modules.batch import carry_state, momentum_argument, warn_left

# (torch's SyncBatchNorm too: it refuses CPU tensors in a process group)
PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm1d, BatchNorm2d,
                     BatchNorm3d)


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _too_few_values(n: int) -> ValueError:
    return ValueError(f"synchronized batch norm: {n} value(s) per channel over the whole group; training needs "
                      "more than one")


def _statistics_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 statistics for float64 inputs, float32 for the others (float16/bfloat16 included)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _AllReduceSum(torch.autograd.Function):
    """The sum over the group's ranks, on every rank, differentiable to any order: the gradient of
    a sum that every rank receives is the sum of every rank's gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def _synchronized_bn(x, weight, bias, eps, group, n: float):
    """:class:`SyncBatchNormFunction`'s output in differentiable torch ops (two all-reduces: the
    group's sum, then its sum of squared deviations from the group's mean, over ``n`` values per
    channel): its backward as a graph, for a gradient of a gradient. Every rank must take it."""
    xs, dims, nd = x.to(_statistics_dtype(x)), F.reduce_dims(x), x.dim()

    def over_group(t):
        return _AllReduceSum.apply(t, group) if _world(group) > 1 else t

    mean = over_group(xs.sum(dims)) / n
    var_biased = over_group((xs - F.per_channel(mean, nd)).square().sum(dims)) / n
    return F.normalize(x, mean, torch.rsqrt(var_biased + eps), weight, bias)


class SyncBatchNormFunction(torch.autograd.Function):
    """y, mean, var_biased, n = BN over the union of the group's batches."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        c = x.shape[1]
        stat_dtype = _statistics_dtype(x)
        xs = x.to(stat_dtype)
        n_local = F.values_per_channel(x) if x.numel() else 0
        if n_local:
            mean_l, var_l = F.batch_stats(xs)
        else:
            mean_l = var_l = torch.zeros(c, dtype=stat_dtype, device=x.device)
        packed = torch.cat([torch.tensor([float(n_local)], dtype=torch.float64, device=x.device),
                            mean_l.double(), (var_l * n_local).double()])
        if _world(group) > 1:
            parts = [torch.empty_like(packed) for _ in range(_world(group))]
            dist.all_gather(parts, packed, group=group)
            gathered = torch.stack(parts)
        else:
            gathered = packed[None]
        counts, means, m2s = gathered[:, :1], gathered[:, 1 : 1 + c], gathered[:, 1 + c :]
        n = counts.sum()
        ctx.group, ctx.n = group, float(n)
        if n == 0:  # every rank's batch is empty: every rank passes it through, with nothing to fold in
            ctx.save_for_backward(x, weight)
            mean, var_biased = (torch.zeros(c, dtype=stat_dtype, device=x.device) for _ in range(2))
            ctx.mark_non_differentiable(mean, var_biased)
            return F.empty_batch(x, weight, bias), mean, var_biased, 0
        if n == 1:
            raise _too_few_values(int(n))
        mean = (counts * means).sum(0) / n
        var_biased = (m2s + counts * (means - mean) ** 2).sum(0) / n
        mean, var_biased = mean.to(stat_dtype), var_biased.to(stat_dtype)
        invstd = torch.rsqrt(var_biased + eps)
        y = F.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var_biased)
        return y, mean, var_biased, int(n)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn):
        if ctx.n == 0:  # (on every rank: no collective)
            x, weight = ctx.saved_tensors
            zeros = torch.zeros_like(weight) if weight is not None else None
            return torch.zeros_like(x), zeros, zeros, None, None
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if graph_backward(dy):
            return gradient_graph(ctx, lambda: _synchronized_bn(x, weight, bias, ctx.eps, ctx.group, ctx.n),
                                  (x, weight, bias), dy)
        nd, dims = x.dim(), F.reduce_dims(x)
        dys = dy.to(mean.dtype)
        x_hat = (x.to(mean.dtype) - F.per_channel(mean, nd)) * F.per_channel(invstd, nd)
        sums = torch.cat([dys.sum(dims), (dys * x_hat).sum(dims)])
        local = sums.clone()
        if _world(ctx.group) > 1:
            dist.all_reduce(sums, group=ctx.group)
        c = mean.shape[0]
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
        dx = F.per_channel(scale / ctx.n, nd) * (
            ctx.n * dys - F.per_channel(sum_dy, nd) - x_hat * F.per_channel(sum_dy_xhat, nd))
        grad_w = local[c:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = local[:c].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx.to(x.dtype), grad_w, grad_b, None, None


class SyncBatchNorm(BatchNorm):
    """Batch Normalization with statistics over every rank of ``process_group`` (default: the world).

    Any rank of input ``(N, C, *)``; any torch.distributed backend (gloo on the CPU, NCCL on GPUs);
    uneven batch sizes and an empty batch on a rank are fine. Without an initialized process group
    it is BN over the local batch. The running statistics fold in the global mean and unbiased
    variance, identically on every rank. Eval mode makes no collective: the running statistics,
    or without them (``track_running_stats=False``) the local batch's, as torch's SyncBatchNorm
    (so a rank may evaluate alone). BN's state_dict keys. In ``nn.DataParallel``'s copies (threads
    of one process, which torch.distributed does not see) it refuses to train.

    Example (in each process of ``torchrun --nproc-per-node 2 train.py``, after
    ``dist.init_process_group("gloo")``):
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = SyncBatchNorm.convert(model)
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """

    passes_empty_batch = False  # an empty rank still joins the collectives
    torch_twin_scripts = False  # (torch.nn.SyncBatchNorm's forward calls torch.distributed, which TorchScript lacks)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    def _check_input(self, x: torch.Tensor) -> None:
        if not self.training:  # (the local batch alone, as BN's)
            return super()._check_input(x)
        state_dtype = F.state_dtype(self.weight, self.running_mean)
        if (x.dim() < 2 or x.shape[1] != self.num_features or not x.is_floating_point()
                or (x.dtype != state_dtype and state_dtype is not None)):  # (one value per channel is the group's)
            F.check_input(x, self.num_features, False, self._label(), state_dtype=state_dtype)  # raises with the reason

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        if not self.training:
            # Eval mode without running statistics: the local batch's, as torch's SyncBatchNorm. A
            # collective here would hang a rank that evaluates alone.
            return super()._train(x, tracking)
        self._refuse_data_parallel("its copies are threads of one process, and it synchronizes torch.distributed's "
                                   "processes, not them (each copy would normalize its own part of the batch)")
        if F.transformed():  # (torch.func's transforms, forward-mode AD: the function is opaque to them)
            if _world(self.process_group) > 1:
                raise ValueError(f"{self._label()}: synchronized batch norm over {_world(self.process_group)} ranks "
                                 "cannot run under torch.func's transforms or forward-mode AD (its collectives are "
                                 "inside an autograd function they cannot see through)")
            if F.values_per_channel(x) == 1:
                raise _too_few_values(1)
            return super()._train(x, tracking)  # (one rank: BN over its batch, on torch's kernels there)
        y, mean, var_biased, n = SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps,
                                                             self.process_group)
        if n == 0:
            return y, None  # (an empty batch on every rank: nothing to fold in or count)
        folded = tracking and F.update_running_stats_(self.running_mean, self.running_var, mean, var_biased, n,
                                                      self.batch_weight())
        return y, folded

    @classmethod
    def convert(cls, model: nn.Module, process_group=None) -> nn.Module:
        """Swap every plain batch-norm layer (torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm, bnlab's
        BatchNorm*) for a SyncBatchNorm with the same state, requires_grad and mode. A torch
        SyncBatchNorm keeps its process group unless ``process_group`` is given. Layers of other
        kinds (Batch Renorm, ghost BN, BN with a fused activation, cross-iteration BN) are left as
        they are, and a warning names them. (torch's ``nn.SyncBatchNorm.convert_sync_batchnorm``
        converts torch's classes only: bnlab's layers stay local there.)"""
        warn_left(model, lambda m: type(m) in PLAIN_BATCH_NORMS or isinstance(m, cls), "SyncBatchNorm.convert",
                  "only plain batch norms (torch's or bnlab's BatchNorm1d/2d/3d) become synchronized")
        return cls._convert(model, process_group)

    @classmethod
    def _convert(cls, model: nn.Module, process_group) -> nn.Module:
        if type(model) in PLAIN_BATCH_NORMS:
            ref = model.weight if model.affine else model.running_mean
            group = process_group if process_group is not None else getattr(model, "process_group", None)
            new = cls(model.num_features, model.eps, momentum_argument(model), model.affine,
                      model.running_mean is not None, group, device=ref.device if ref is not None else None,
                      dtype=ref.dtype if ref is not None else None)
            return carry_state(model, new)
        for name, child in model.named_children():
            setattr(model, name, cls._convert(child, process_group))
        return name_layers(model)
