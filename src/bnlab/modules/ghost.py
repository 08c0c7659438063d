"""Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual sub-batches in training."""

from __future__ import annotations

import torch

from bnlab import functional as F
from bnlab.modules.batch import BatchNorm


class GhostBatchNorm(BatchNorm):
    """Ghost Batch Normalization (Hoffer et al. 2017): BN over virtual sub-batches in training.

    Training splits the batch into consecutive chunks of ``virtual_batch_size`` examples and
    normalizes each with its own statistics; the running statistics fold in, once per forward,
    the average of the chunks' means and of their unbiased variances. Inference uses the running
    statistics like BN (never virtual batches: the bug some implementations had), or without
    them (``track_running_stats=False``) the whole batch's statistics, as torch's BN. BN's
    state_dict keys.

    Example:
        >>> layer = GhostBatchNorm2d(64, virtual_batch_size=32)   # batch 256 = 8 ghost batches
    """

    setting_checks = {**BatchNorm.setting_checks,
                      "virtual_batch_size": lambda layer, size: F.check_virtual_batch_size(size)}

    def __init__(self, num_features, virtual_batch_size=32, **kwargs):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        if not self.training:
            # Eval mode without running statistics: the whole batch's, as torch's BN. An inference
            # output must not depend on how the batch is chunked.
            return super()._train(x, tracking)
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
