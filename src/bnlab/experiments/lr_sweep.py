"""Higher learning rates: training accuracy with and without BN across learning rates.

Ioffe & Szegedy (2015, section 3.3) argue that BN makes a layer's output invariant to the scale
of its weights, so large learning rates no longer blow up activations and gradients, and their
Inception results (section 4.2) raise the learning rate 5x and 30x with BN, where the same 5x
without BN diverged. Here the textbook's network and protocol (:mod:`bnlab.experiments.sweeps`:
Affine -> (BN) -> ReLU five times then a softmax layer, the first 1,000 MNIST training images,
plain SGD, mini-batches of 100 drawn with replacement, 20 epochs of 10 steps) from He's init
(std sqrt(2 / fan_in), where the plain network trains), at learning rates from 0.01 to 10
(log-spaced), with and without BN, from the same weights on the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from bnlab.experiments import runs, sweeps


@dataclass(frozen=True)
class Config(sweeps.SweepConfig):
    EXPERIMENT: ClassVar[str] = "lr-sweep"
    AXIS: ClassVar[str] = "learning rate"
    lrs: int = 7  # learning rates, log-spaced from 10^lr_log10_max down to 10^lr_log10_min
    lr_log10_max: float = 1.0  # largest learning rate: 10^this
    lr_log10_min: float = -2.0  # smallest learning rate: 10^this

    def __post_init__(self):
        super().__post_init__()
        runs.check(self, lrs=runs.POSITIVE)
        sweeps.check_span(self, "lr_log10_max", "lr_log10_min", "lrs")

    def quick(self) -> "Config":
        """Three learning rates for a few epochs: the demo and CI."""
        return replace(self, lrs=3, epochs=4)

    def values(self) -> list[float]:
        return sweeps.log_values(self.lr_log10_max, self.lr_log10_min, self.lrs)

    def settings(self) -> list[tuple[None, float]]:
        return [(None, lr) for lr in self.values()]  # He's init


run, sweep, load_config = sweeps.experiment(Config)
plot = sweeps.plot
