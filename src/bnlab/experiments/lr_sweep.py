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

from bnlab.data import Dataset, load_dataset
from bnlab.experiments import runs, sweeps


@dataclass(frozen=True)
class Config(sweeps.SweepConfig):
    lrs: int = 7  # learning rates, log-spaced from 10^lr_log10_max down to 10^lr_log10_min
    lr_log10_max: float = 1.0  # largest learning rate: 10^this
    lr_log10_min: float = -2.0  # smallest learning rate: 10^this

    def quick(self) -> "Config":
        """Three learning rates for a few epochs: the demo and CI."""
        return replace(self, lrs=3, epochs=4)

    def lr_values(self) -> list[float]:
        return sweeps.log_values(self.lr_log10_max, self.lr_log10_min, self.lrs)


def run(cfg: Config, resume: bool = False) -> dict:
    """Load the data and run the sweep (:func:`sweep`)."""
    data = load_dataset(cfg.data_dir, cfg.download)
    print(f"data: {data.source} ({len(data.x_train)} train images, the first {cfg.train_examples} used)")
    return sweep(cfg, data, resume)


def sweep(cfg: Config, data: Dataset, resume: bool = False) -> dict:
    """Both networks at every learning rate (He's init); metrics, the table and the figure in ``cfg.out``."""
    if cfg.out is None:
        cfg = replace(cfg, out=runs.default_out("lr-sweep"))
    lrs = cfg.lr_values()
    return sweeps.grid(cfg, data, resume, "lr-sweep", "learning rate", lrs, [(None, lr) for lr in lrs])


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config)


plot = sweeps.plot
