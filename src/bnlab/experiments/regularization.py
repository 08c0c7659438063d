"""Overfitting and regularization: train against test accuracy, plain and with weight decay, dropout or BN.

The textbook (Saito, Deep Learning from Scratch, chapter 6) makes a network overfit on purpose:
300 MNIST training images, Affine -> ReLU six times with 100 units then a softmax layer, He's init,
plain SGD at 0.01 on mini-batches of 100 for 301 epochs; training accuracy reaches 1.0 while test
accuracy stays far below. L2 weight decay (lambda 0.1 on the weights) and dropout (ratio 0.2
after each ReLU) narrow that gap. Ioffe & Szegedy (2015, sections 3.4 and 4.2.1) add that BN
regularizes too (a training example is seen with a batch's statistics, not alone) and let
Inception drop dropout. Each variant here starts from the same weights and sees the same batches
(:mod:`bnlab.experiments.sweeps`); train and test accuracy are measured after every epoch in
inference mode on the 300 images and the whole test set.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar


from bnlab.data import load_dataset
from bnlab.experiments import runs, sweeps
from bnlab.train import LoopConfig, fit, has_checkpoint

VARIANTS = ("plain", "weight-decay", "dropout", "bn")


@dataclass(frozen=True)
class Config(sweeps.SweepConfig):
    EXPERIMENT: ClassVar[str] = "regularization"
    train_examples: int = 300  # the first this many training images are the whole training set
    hidden_layers: int = 6  # Affine -> (BN) -> ReLU (-> Dropout) blocks before the softmax layer
    epochs: int = 301  # evaluations; an epoch is train_examples / batch steps
    lr: float = 0.01  # plain SGD learning rate
    weight_decay: float = 0.1  # L2 lambda on the Affine weights in the "weight-decay" variant
    dropout: float = 0.2  # dropout ratio after each ReLU in the "dropout" variant
    variants: str = ",".join(VARIANTS)  # comma-separated, from: plain weight-decay dropout bn

    def __post_init__(self):
        super().__post_init__()
        runs.check(self, lr=runs.POSITIVE, weight_decay=runs.NON_NEGATIVE, dropout=runs.within(0, 1, open_high=True))
        self.variant_names()

    def variant_names(self) -> list[str]:
        return runs.parse_list(self, "variants", choices=VARIANTS, what="variant", unique=True)

    def quick(self) -> "Config":
        """A few epochs: the demo and CI."""
        return replace(self, epochs=10)


def task(cfg: Config, variant: str, data, x, y, test=None) -> sweeps.SweepTask:
    """The run of one variant on the training images ``x, y``, measured on ``test`` (the data's test set)."""
    runs.check_choice(variant, VARIANTS, "variant")
    return sweeps.SweepTask(cfg, None, cfg.lr, variant == "bn", x, y, data.num_classes,
                            dropout=cfg.dropout if variant == "dropout" else 0.0,
                            weight_decay=cfg.weight_decay if variant == "weight-decay" else 0.0,
                            held_out={"test": test if test is not None else sweeps.test_set(data)})


def run(cfg: Config, resume: bool = False) -> dict:
    """Every variant; train and test accuracy per epoch, the table and the figure in ``cfg.out``."""
    cfg = runs.with_out(cfg, Config.EXPERIMENT)
    data = load_dataset(cfg.data_dir, cfg.download)
    print(f"data: {data.source} (the first {cfg.train_examples} of {len(data.x_train)} train images; "
          f"{len(data.x_test)} test)")
    variants = cfg.variant_names()
    (x, y), test = sweeps.training_images(cfg, data), sweeps.test_set(data)
    tasks = {v: task(cfg, v, data, x, y, test) for v in variants}
    out = runs.claim(cfg.out, resume)
    runs.record(out, Config.EXPERIMENT, cfg, data.source)
    steps_per_epoch = max(1, cfg.train_examples // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    from tqdm.auto import tqdm

    curves = {}
    with tqdm(total=len(variants) * steps, desc=f"{len(variants)} runs", unit="step", dynamic_ncols=True) as bar:
        for v, t in tasks.items():
            loop = LoopConfig(steps, steps_per_epoch, steps, out / v)
            rows = fit(t, loop, resume=resume and has_checkpoint(loop.out), progress=bar.update)
            curves[v] = {k: [row[k] for row in rows] for k in ("train_accuracy", "test_accuracy")}
    summary = {"variants": variants, "epochs": list(range(cfg.epochs + 1)), "curves": curves,
               "final": {v: {"train": c["train_accuracy"][-1], "test": c["test_accuracy"][-1],
                             "best_test": max(c["test_accuracy"])} for v, c in curves.items()}}
    runs.write_metrics(out, summary)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "epoch", "train_accuracy", "test_accuracy"])
        for v, c in curves.items():
            for e, (a, b) in enumerate(zip(c["train_accuracy"], c["test_accuracy"])):
                writer.writerow([v, e, f"{a:.4f}", f"{b:.4f}"])
    figure = plot(out)
    print(table(summary))
    print(f"figure: {figure}\nmetrics: {out / 'metrics.csv'}")
    return summary


def table(summary: dict) -> str:
    lines = [f"{'variant':<14}{'train':>8}{'test':>8}{'gap':>8}{'best test':>11}"]
    for v, f in summary["final"].items():
        lines.append(f"{v:<14}{f['train']:>8.4f}{f['test']:>8.4f}{f['train'] - f['test']:>8.4f}{f['best_test']:>11.4f}")
    return "\n".join(lines)


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config, Config.EXPERIMENT)


def plot(run_dir) -> Path:
    """Train and test accuracy per epoch, one panel per variant (the textbook's overfitting figures)."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    summary = runs.read_metrics(run_dir)
    variants, epochs = summary["variants"], summary["epochs"]
    fig, axes = plt.subplots(1, len(variants), figsize=(3.4 * len(variants), 3.2), sharey=True, squeeze=False)
    for ax, v in zip(axes[0], variants):
        ax.plot(epochs, summary["curves"][v]["train_accuracy"], "-", color="tab:blue", label="train")
        ax.plot(epochs, summary["curves"][v]["test_accuracy"], "--", color="tab:orange", label="test")
        ax.set(title=v, xlabel="epoch", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="lower right")
    fig.suptitle("Overfitting 300 images: train against test accuracy")
    fig.tight_layout()
    return runs.save_figure(fig, run_dir, dpi=110)
