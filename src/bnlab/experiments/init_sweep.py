"""Weight-initialization sensitivity: training accuracy with and without BN across init scales.

The textbook treatment of BN (Saito, Deep Learning from Scratch, chapter 6) trains the same
fully connected ReLU network, Affine -> (BN) -> ReLU five times then a softmax layer, from weights
drawn from N(0, std^2) for 16 values of std from 1 down to 1e-4 (log-spaced), on the first 1,000
MNIST training images: plain SGD at learning rate 0.01, mini-batches of 100 drawn with replacement,
20 epochs of 10 steps. Training accuracy is measured after every epoch in inference mode (BN with
its running statistics). The claim: with BN the network learns at almost every scale; without it,
most scales never leave chance (activations vanish or explode through the layers).

Here each std trains both networks from the same initial weights on the same batches
(:mod:`bnlab.experiments.sweeps`). BN is :class:`bnlab.BatchNorm1d` with the textbook's epsilon
(1e-6) and momentum (0.9 kept, 0.1 in torch's convention); its running variance starts at 1
(torch's), where the textbook's starts at 0, which changes only the first epochs' evaluations.
The figure is the textbook's 4x4 grid, one panel per std.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from bnlab.experiments import runs, sweeps


@dataclass(frozen=True)
class Config(sweeps.SweepConfig):
    EXPERIMENT: ClassVar[str] = "init-sweep"
    AXIS: ClassVar[str] = "init std"
    stds: int = 16  # init stds, log-spaced from 10^std_log10_max down to 10^std_log10_min
    std_log10_max: float = 0.0  # largest std: 10^this
    std_log10_min: float = -4.0  # smallest std: 10^this
    lr: float = 0.01  # plain SGD learning rate

    def __post_init__(self):
        super().__post_init__()
        runs.check(self, stds=runs.POSITIVE, lr=runs.POSITIVE)
        sweeps.check_span(self, "std_log10_max", "std_log10_min", "stds")

    def quick(self) -> "Config":
        """Four stds for a few epochs: the demo and CI."""
        return replace(self, stds=4, epochs=4)

    def values(self) -> list[float]:
        return sweeps.log_values(self.std_log10_max, self.std_log10_min, self.stds)

    def settings(self) -> list[tuple[float, float]]:
        return [(std, self.lr) for std in self.values()]


run, sweep, load_config = sweeps.experiment(Config)
plot = sweeps.plot
