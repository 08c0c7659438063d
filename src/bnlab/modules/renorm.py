"""Batch Renormalization (Ioffe 2017): BN corrected towards the moving averages by r and d."""

from __future__ import annotations

import torch

from bnlab import functional as F
from bnlab.modules.batch import BatchNorm, _real, _steps

_LIMITS = ("Batch Renorm clips r to [1/r_max, r_max] and d to [-d_max, d_max]: it needs r_max >= 1 and d_max >= 0, "
           "got {}")


class BatchRenorm(BatchNorm):
    """Batch Renormalization (Ioffe 2017) over dimension 1 of an ``(N, C, *)`` input.

    Training: y = weight * ((x - mu_B) / sigma_B * r + d) + bias with sigma_B = sqrt(sigma2_B + eps),
    r = clip(sigma_B / sigma, 1/r_max_t, r_max_t) and d = clip((mu_B - mu) / sigma, -d_max_t, d_max_t)
    held constant in backprop, mu and sigma the moving mean and standard deviation (buffers
    ``running_mean``, ``running_std``; rate ``momentum``, the new batch's weight, or with
    ``momentum=None`` the equal-weight average of every batch, as BN's). The limits follow
    the paper's schedule in ``num_batches_tracked``: (1, 0), plain BN, for ``warmup`` steps, then
    relaxed linearly to ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps``. With
    r_max=1 and d_max=0 it is BN. Inference: y = weight * (x - mu) / sigma + bias. A BN layer's
    state_dict loads into it (sigma = sqrt(running_var + eps)), with the same inference outputs.
    Under activation checkpointing the recomputation of a forward takes r and d from the moving
    averages that forward had (kept for the layer's last 32 forwards, found by the batch's
    statistics: two calls on identical batches before one backward, inside checkpointed segments,
    cannot be told apart and raise where their states differ) and updates nothing.

    Example:
        >>> layer = BatchRenorm2d(64, r_max=3.0, d_max=5.0)   # for micro-batches of 4, say
    """

    needs_running_stats = "Batch Renorm corrects each batch towards its moving averages"
    per_channel = ("weight", "bias", "running_mean", "running_std")
    setting_checks = {
        **BatchNorm.setting_checks,
        "r_max": lambda layer, r_max: _real("r_max", r_max, 1.0, why=_LIMITS.format(f"r_max={r_max!r}")),
        "d_max": lambda layer, d_max: _real("d_max", d_max, 0.0, why=_LIMITS.format(f"d_max={d_max!r}")),
        "warmup": lambda layer, steps: _steps("warmup", steps),
        "r_max_steps": lambda layer, steps: _steps("r_max_steps", steps),
        "d_max_steps": lambda layer, steps: _steps("d_max_steps", steps),
    }

    def __init__(self, num_features, eps=1e-5, momentum=0.01, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, r_max=3.0, d_max=5.0, warmup=5_000, r_max_steps=40_000, d_max_steps=25_000):
        if not track_running_stats:
            raise ValueError(f"{self.needs_running_stats}, so it keeps them (track_running_stats=True); BN without "
                             "running statistics is bnlab.BatchNorm2d(..., track_running_stats=False)")
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

    def _upgrade_checkpoint(self, state_dict, prefix: str, version: int | None) -> None:
        """BN's upgrade, and a BN checkpoint (torch's or bnlab's: running_var, no running_std) with
        sigma = sqrt(running_var + eps), so inference gives BN's outputs; training goes on from its
        num_batches_tracked in the limits' schedule."""
        super()._upgrade_checkpoint(state_dict, prefix, version)
        var_key, std_key = prefix + "running_var", prefix + "running_std"
        if var_key in state_dict and std_key not in state_dict:
            state_dict[std_key] = (state_dict.pop(var_key) + self.eps).sqrt()

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_renorm_eval(x, self.weight, self.bias, self.running_mean, self.running_std)

    # Eager under torch.compile: a compiled graph recomputes r from running_std in the backward,
    # after the in-place update of the moving statistics (autograd's version check then fails).
    @F.eager_under_compile
    def _train(self, x: torch.Tensor, tracking: bool) -> tuple[torch.Tensor, bool]:
        r_max, d_max = self.limits()
        # r and d come from the moving averages: kept for a recomputation, as the limits are (in the
        # warm-up, r = 1 and d = 0 whatever they are: nothing to keep, and two such forwards agree)
        moving = (self.running_mean.clone(), self.running_std.clone()) if (r_max, d_max) != (1.0, 0.0) else None
        y, mean, invstd, folded = F.batch_renorm_train(
            x, self.weight, self.bias, self.running_mean, self.running_std, r_max, d_max, self.eps, self.batch_weight())
        self._remember(mean, invstd.reciprocal().square() - self.eps, (moving, r_max, d_max))
        return y, folded

    def _recompute(self, x: torch.Tensor) -> torch.Tensor:
        # r and d from the moving averages and limits that the forward being recomputed had
        moving, r_max, d_max = self._recall(x)
        mean, std = (moving if moving is not None else (self.running_mean, self.running_std))
        return F.batch_renorm_train(x, self.weight, self.bias, mean.clone(), std.clone(), r_max, d_max, self.eps,
                                    0.0)[0]


class BatchRenorm1d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C)`` or ``(N, C, L)`` inputs."""

    ranks = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C, H, W)`` inputs."""

    ranks = (4,)


class BatchRenorm3d(BatchRenorm):
    """:class:`BatchRenorm` over ``(N, C, D, H, W)`` inputs."""

    ranks = (5,)
