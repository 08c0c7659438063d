"""Hyperparameter search on a validation split, with and without BN.

The textbook (Saito, Deep Learning from Scratch, chapter 6) tunes the learning rate and the weight
decay of Affine -> ReLU six times with 100 units then a softmax layer by random search: 500 MNIST
training images, shuffled, 20% of them held out for validation; 100 trials drawing the learning
rate from 10^U(-6, -2) and the weight decay from 10^U(-8, -4); 50 epochs of plain SGD on batches of
100 each; the 20 best by validation accuracy show where to narrow the ranges. The test set is
never used to choose. Here every trial trains the network with and without BN at the same
hyperparameters, from the same weights (He's init) on the same batches
(:mod:`bnlab.experiments.sweeps`); after the search, each network's best trial is trained again
(the same run: deterministic) and measured once on the test set.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from bnlab.data import load_dataset
from bnlab.experiments import runs, sweeps
from bnlab.experiments.runs import ConfigError
from bnlab.train import CHECKPOINT, LoopConfig, fit, has_checkpoint


@dataclass(frozen=True)
class Config(sweeps.SweepConfig):
    EXPERIMENT: ClassVar[str] = "hparam-search"
    train_examples: int = 500  # the first this many training images, validation included
    validation_fraction: float = 0.2  # of those, held out (after a shuffle) to choose by
    hidden_layers: int = 6  # Affine -> (BN) -> ReLU blocks before the softmax layer
    epochs: int = 50  # an epoch is (train_examples - validation) / batch steps
    trials: int = 100  # random (learning rate, weight decay) draws, each trained with and without BN
    lr_log10: str = "-6,-2"  # the learning rate is 10^U(a, b)
    weight_decay_log10: str = "-8,-4"  # the weight decay is 10^U(a, b)
    best: int = 20  # the best trials by validation accuracy (all, when fewer): shown, and their ranges reported

    def __post_init__(self):
        super().__post_init__()
        runs.check(self, validation_fraction=runs.within(0, 1), trials=runs.POSITIVE,
                   best=runs.POSITIVE)
        self.bounds()

    def quick(self) -> "Config":
        """Six trials of a few epochs: the demo and CI."""
        return replace(self, trials=6, epochs=5, best=3)

    def bounds(self) -> list[tuple[float, float]]:
        """The exponents' ranges ``(a, b)``: the learning rate's, then the weight decay's."""
        ranges = [runs.parse_list(self, name, float) for name in ("lr_log10", "weight_decay_log10")]
        for name, values in zip(("lr_log10", "weight_decay_log10"), ranges):
            if len(values) != 2 or not all(math.isfinite(v) for v in values):
                raise ConfigError(f"{runs.flag(name)} takes two finite numbers a,b; got {getattr(self, name)!r}")
        return [tuple(values) for values in ranges]

    def draws(self) -> list[tuple[float, float]]:
        """The trials' (learning rate, weight decay), from ``seed``."""
        bounds = self.bounds()
        rng = np.random.default_rng(self.seed)
        return [(10 ** rng.uniform(*bounds[0]), 10 ** rng.uniform(*bounds[1])) for _ in range(self.trials)]


def split(cfg: Config, data):
    """Shuffle the first ``train_examples`` images (seeded) and hold out ``validation_fraction``."""
    n_val = int(round(cfg.train_examples * cfg.validation_fraction))
    if not 0 < n_val < cfg.train_examples:
        raise ConfigError(f"--validation-fraction {cfg.validation_fraction} leaves no training or no validation images")
    order = np.random.default_rng(cfg.seed).permutation(cfg.train_examples)
    x, y = sweeps.training_images(cfg, data, order)
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val]), order[n_val:], order[:n_val]


def run(cfg: Config, resume: bool = False) -> dict:
    """The search; trials, the best, the narrowed ranges and the figure in ``cfg.out``."""
    cfg = runs.with_out(cfg, Config.EXPERIMENT)
    data = load_dataset(cfg.data_dir, cfg.download)
    (x, y), (x_val, y_val), _, _ = split(cfg, data)
    draws = cfg.draws()
    print(f"data: {data.source} ({len(x)} training and {len(x_val)} validation images of the first "
          f"{cfg.train_examples}; the test set is used once, after the search)")
    out = runs.claim(cfg.out, resume, records=("trials.jsonl",))  # (finished trials keep no checkpoint)
    runs.record(out, Config.EXPERIMENT, cfg, data.source)
    steps_per_epoch = max(1, len(x) // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    record_path = out / "trials.jsonl"
    done = {}
    if resume and record_path.exists():
        for line in record_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["trial"], row["network"])] = row
    from tqdm.auto import tqdm

    def train(lr, decay, network, folder, held_out):
        task = sweeps.SweepTask(cfg, None, lr, network == "bn", x, y, data.num_classes, weight_decay=decay,
                                held_out=held_out)
        loop = LoopConfig(steps, steps_per_epoch, steps, folder)
        return fit(task, loop, resume=resume and has_checkpoint(folder), progress=bar.update)

    trials = []
    with tqdm(total=2 * len(draws) * steps, desc=f"{len(draws)} trials x 2", unit="step", dynamic_ncols=True) as bar:
        for k, (lr, decay) in enumerate(draws):
            for network in sweeps.NETWORKS:
                row = done.get((k, network))
                if row is None:
                    folder = out / "trials" / f"{k:03d}-{network}"
                    rows = train(lr, decay, network, folder, {"validation": (x_val, y_val)})
                    row = {"trial": k, "network": network, "lr": lr, "weight_decay": decay,
                           "validation_accuracy": rows[-1]["validation_accuracy"],
                           "train_accuracy": rows[-1]["train_accuracy"]}
                    with open(record_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    (folder / CHECKPOINT).unlink()  # (its result is in trials.jsonl; 200 models would be ~100 MB)
                else:
                    bar.update(steps)
                trials.append(row)
        best, test = {}, sweeps.test_set(data)
        for network in sweeps.NETWORKS:
            ranked = sorted((t for t in trials if t["network"] == network), key=lambda t: -t["validation_accuracy"])
            top = ranked[: cfg.best]
            winner = top[0]  # trained again, the same run, and measured once on the test set
            bar.total += steps
            rows = train(winner["lr"], winner["weight_decay"], network, out / f"best-{network}",
                         {"validation": (x_val, y_val), "test": test})
            best[network] = {
                "top": top, "test_accuracy": rows[-1]["test_accuracy"],
                "validation_accuracy_retrained": rows[-1]["validation_accuracy"],
                "lr_log10_range": [float(np.log10(min(t["lr"] for t in top))),
                                   float(np.log10(max(t["lr"] for t in top)))],
                "weight_decay_log10_range": [float(np.log10(min(t["weight_decay"] for t in top))),
                                             float(np.log10(max(t["weight_decay"] for t in top)))],
            }
    summary = {"trials": trials, "best": best}
    runs.write_metrics(out, summary)
    figure = plot(out)
    print(table(summary))
    print(f"figure: {figure}\ntrials: {record_path}")
    return summary


def table(summary: dict) -> str:
    lines = []
    for network, b in summary["best"].items():
        lines.append(f"{'with BN' if network == 'bn' else 'without BN'}: the {len(b['top'])} best of "
                     f"{sum(t['network'] == network for t in summary['trials'])} trials by validation accuracy")
        lines.append(f"  {'validation':>10}  {'lr':>9}  {'weight decay':>12}")
        for t in b["top"][:5]:
            lines.append(f"  {t['validation_accuracy']:>10.4f}  {t['lr']:>9.2e}  {t['weight_decay']:>12.2e}")
        lines.append(f"  narrow to lr 10^[{b['lr_log10_range'][0]:.2f}, {b['lr_log10_range'][1]:.2f}], weight decay "
                     f"10^[{b['weight_decay_log10_range'][0]:.2f}, {b['weight_decay_log10_range'][1]:.2f}]")
        lines.append(f"  the best trial, trained again: test accuracy {b['test_accuracy']:.4f} (measured once)")
    return "\n".join(lines)


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config, Config.EXPERIMENT)


def plot(run_dir) -> Path:
    """Validation accuracy over (learning rate, weight decay), one panel per network; the best circled."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    summary = runs.read_metrics(run_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharex=True, sharey=True)
    for ax, network in zip(axes, sweeps.NETWORKS):
        trials = [t for t in summary["trials"] if t["network"] == network]
        points = ax.scatter([t["lr"] for t in trials], [t["weight_decay"] for t in trials],
                            c=[t["validation_accuracy"] for t in trials], cmap="viridis", vmin=0, vmax=1, s=22)
        top = summary["best"][network]["top"]
        ax.scatter([t["lr"] for t in top], [t["weight_decay"] for t in top], s=90, facecolors="none",
                   edgecolors="tab:red", label=f"the {len(top)} best")
        ax.set(xscale="log", yscale="log", xlabel="learning rate", title="with BN" if network == "bn" else "without BN")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weight decay")
    # (in the figure's corner, not the axes': random draws can fill any corner of the panels)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper left", frameon=False)
    fig.colorbar(points, ax=axes, label="validation accuracy")
    fig.suptitle("Random search on a validation split")
    return runs.save_figure(fig, run_dir, dpi=110)
