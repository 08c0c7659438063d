"""The textbook's sweeps: one fully connected ReLU network trained with and without BN at each
value of a setting (the init scale, the learning rate), from the same weights on the same batches.

Network (:func:`mlp`): Affine -> (BN) -> ReLU, ``hidden_layers`` times, then Affine with the
softmax in the loss; the BN network drops the biases that BN's beta replaces (Ioffe & Szegedy).
Training (:class:`SweepTask`, through :func:`bnlab.train.fit`): the first ``train_examples``
training images, plain SGD, mini-batches drawn with replacement, ``epochs`` epochs; training
accuracy after every epoch in inference mode (BN with its running statistics). :func:`grid` runs
every (value, with/without BN) pair and writes ``metrics.json``, ``metrics.csv``, the table and
:func:`plot`'s grid of panels, one per value.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab.data import Dataset, load_dataset
from bnlab.experiments import runs
from bnlab.experiments.runs import ConfigError
from bnlab.train import LoopConfig, fit, has_checkpoint

NETWORKS = ("plain", "bn")
LEARNED = 0.5  # a run "learns" when its final training accuracy passes this (chance is 0.1)


@dataclass(frozen=True)
class SweepConfig:
    out: str | None = None  # run directory; default runs/<experiment>-<time>
    data_dir: str | None = None  # MNIST or any IDX dataset in its layout; else $BNLAB_DATA, cache, digits
    download: bool = False  # download MNIST (MD5-checked) when it is not found
    train_examples: int = 1_000  # the first this many training images are the whole training set
    hidden_layers: int = 5  # Affine -> (BN) -> ReLU blocks before the softmax layer
    width: int = 100  # units per hidden layer
    batch: int = 100  # mini-batch, drawn with replacement
    epochs: int = 20  # evaluations; an epoch is train_examples / batch steps
    eps: float = 1e-6  # BN's epsilon (the textbook's; torch's default is 1e-5)
    seed: int = 0  # initial weights (shared by the two networks at a value) and batch order

    def __post_init__(self):
        # (the upper bound of train_examples depends on the data: training_images checks it)
        runs.check(self, train_examples=runs.POSITIVE, hidden_layers=runs.POSITIVE, width=runs.POSITIVE,
                   batch=runs.at_least(2), epochs=runs.POSITIVE, eps=runs.POSITIVE, seed=runs.NON_NEGATIVE)


def check_span(cfg, top: str, bottom: str, count: str) -> None:
    """Refuse a log-spaced axis that cannot be drawn: exponents that are not finite, or one value
    ``count`` times (the same runs, one point of the figure)."""
    runs.check(cfg, **{top: runs.FINITE, bottom: runs.FINITE})
    if getattr(cfg, count) > 1 and getattr(cfg, top) == getattr(cfg, bottom):
        raise ConfigError(f"{runs.flag(top)} and {runs.flag(bottom)} are both {getattr(cfg, top)}: "
                               f"{runs.flag(count)} {getattr(cfg, count)} would be one value that many times")


def log_values(top: float, bottom: float, count: int) -> list[float]:
    """``count`` values from 10^top down to 10^bottom, log-spaced."""
    return [float(v) for v in np.logspace(top, bottom, count)]


def mlp(inputs: int, classes: int, cfg: SweepConfig, batch_norm: bool, dropout: float = 0.0) -> nn.Sequential:
    """Affine -> (BN) -> ReLU (-> Dropout), ``cfg.hidden_layers`` times, then Affine (softmax in the loss)."""
    layers, width = [], inputs
    for _ in range(cfg.hidden_layers):
        layers += [nn.Linear(width, cfg.width, bias=not batch_norm)]
        layers += [bnlab.BatchNorm1d(cfg.width, eps=cfg.eps)] if batch_norm else []
        layers += [nn.ReLU()]
        layers += [nn.Dropout(dropout)] if dropout > 0 else []
        width = cfg.width
    return nn.Sequential(*layers, nn.Linear(width, classes))


def init_weights_(model: nn.Module, std: float | None, seed: int) -> None:
    """Weights from N(0, std^2) (``None``: He's sqrt(2 / fan_in) per layer), biases zero, drawn
    layer by layer from ``seed``: a network with and one without BN get the same weights (BN's
    gamma = 1 and beta = 0 are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                scale = std if std is not None else math.sqrt(2.0 / layer.weight.shape[1])
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * scale)
                if layer.bias is not None:
                    layer.bias.zero_()


class SweepTask:
    """One (init std, learning rate, with or without BN) run for :func:`bnlab.train.fit`;
    optionally with dropout, L2 weight decay on the Affine weights (the textbook's
    0.5 lambda sum W^2: lambda W in the gradient, biases and BN's gamma/beta left alone), and
    held-out sets measured beside the training set (``held_out={"test": (x, y)}`` reports
    ``test_accuracy``)."""

    def __init__(self, cfg: SweepConfig, std: float | None, lr: float, batch_norm: bool, x: torch.Tensor,
                 y: torch.Tensor, classes: int, dropout: float = 0.0, weight_decay: float = 0.0,
                 held_out: dict | None = None):
        self.cfg, self.x, self.y, self.held_out = cfg, x, y, held_out or {}
        self.model = bnlab.name_layers(mlp(x.shape[1], classes, cfg, batch_norm, dropout))
        init_weights_(self.model, std, cfg.seed)
        weights = [m.weight for m in self.model if isinstance(m, nn.Linear)]
        others = [p for p in self.model.parameters() if all(p is not w for w in weights)]
        self.opt = torch.optim.SGD([{"params": weights, "weight_decay": weight_decay}, {"params": others}], lr=lr)
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        self.dropout_rng = torch.Generator().manual_seed(cfg.seed + 2) if dropout > 0 else None

    def train_step(self, step: int) -> None:
        i = torch.randint(0, len(self.x), (self.cfg.batch,), generator=self.sampler)  # with replacement
        own_masks = self.dropout_rng is not None  # dropout's masks from this run's generator, not the global one
        with torch.random.fork_rng(devices=[]) if own_masks else contextlib.nullcontext():
            if own_masks:
                torch.manual_seed(int(torch.randint(0, 2**62, (), generator=self.dropout_rng)))
            loss = nn.functional.cross_entropy(self.model(self.x[i]), self.y[i])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def evaluate(self, step: int) -> dict[str, float]:
        with bnlab.evaluating(self.model):
            logits = self.model(self.x)
            result = {"train_accuracy": (logits.argmax(1) == self.y).double().mean().item()}
            for name, (xs, ys) in self.held_out.items():
                chunks = zip(xs.split(2000), ys.split(2000))
                correct = sum(int((self.model(xb).argmax(1) == yb).sum()) for xb, yb in chunks)
                result[f"{name}_accuracy"] = correct / len(xs)
        loss = nn.functional.cross_entropy(logits, self.y).item()
        return {**result, "train_loss": loss if math.isfinite(loss) else None}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.dropout_rng is not None:
            state["rng.dropout"] = self.dropout_rng.get_state()
        return {**state, "rng.sampler": self.sampler.get_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.sampler.set_state(tensors["rng.sampler"])
        if self.dropout_rng is not None:
            self.dropout_rng.set_state(tensors["rng.dropout"])


def images(pixels: np.ndarray) -> torch.Tensor:
    """Flattened uint8 images as float32 in [0, 1] (the textbook's normalization)."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def training_images(cfg: SweepConfig, data: Dataset, order: np.ndarray | None = None):
    """The first ``cfg.train_examples`` training images and labels (in ``order``, a permutation of
    them, when given); a count the data does not hold is refused."""
    if not 0 < cfg.train_examples <= len(data.x_train):
        raise ConfigError(f"--train-examples must be 1..{len(data.x_train)} for {data.name}, got {cfg.train_examples}")
    rows = order if order is not None else slice(0, cfg.train_examples)
    return images(data.x_train[rows]), torch.from_numpy(data.y_train[rows])


def test_set(data: Dataset):
    return images(data.x_test), torch.from_numpy(data.y_test)


def experiment(config_cls):
    """An experiment module's ``run``, ``sweep``, ``load_config`` for a sweep whose config class
    names its experiment and axis (``EXPERIMENT``, ``AXIS``) and gives its ``values()`` and
    ``settings()`` (:func:`grid`'s)."""

    def sweep(cfg, data: Dataset, resume: bool = False) -> dict:
        """Both networks at every value; metrics, the table and the figure in ``cfg.out``."""
        cfg = runs.with_out(cfg, config_cls.EXPERIMENT)
        return grid(cfg, data, resume, config_cls.EXPERIMENT, config_cls.AXIS, cfg.values(), cfg.settings())

    def run(cfg, resume: bool = False) -> dict:
        """Load the data and run the sweep."""
        data = load_dataset(cfg.data_dir, cfg.download)
        print(f"data: {data.source} ({len(data.x_train)} train images, the first {cfg.train_examples} used)")
        return sweep(cfg, data, resume)

    def load_config(run_dir):
        return runs.load_config(run_dir, config_cls, config_cls.EXPERIMENT)

    return run, sweep, load_config


def grid(cfg: SweepConfig, data: Dataset, resume: bool, experiment: str, axis: str, values: list[float],
         settings: list[tuple[float | None, float]]) -> dict:
    """Train both networks at every ``settings[k] = (init std or None for He's, learning rate)``,
    labelled ``values[k]`` on ``axis``; write metrics, the table and the figure into ``cfg.out``."""
    x, y = training_images(cfg, data)
    out = runs.claim(cfg.out, resume)
    runs.record(out, experiment, cfg, data.source)
    steps_per_epoch = max(1, cfg.train_examples // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    from tqdm.auto import tqdm

    curves = {name: [] for name in NETWORKS}
    with tqdm(total=2 * len(settings) * steps, desc=f"{2 * len(settings)} runs", unit="step",
              dynamic_ncols=True) as bar:
        for k, (std, lr) in enumerate(settings):
            for name in NETWORKS:
                task = SweepTask(cfg, std, lr, name == "bn", x, y, data.num_classes)
                loop = LoopConfig(steps, steps_per_epoch, steps, out / f"{k:02d}-{name}")
                done = resume and has_checkpoint(loop.out)
                rows = fit(task, loop, resume=done, progress=bar.update)
                curves[name].append([row["train_accuracy"] for row in rows])
    summary = {"axis": axis, "values": values, "epochs": list(range(cfg.epochs + 1)), "train_accuracy": curves,
               "final": {name: [c[-1] for c in curves[name]] for name in NETWORKS}}
    runs.write_metrics(out, summary)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([axis, "network", *[f"epoch {e}" for e in summary["epochs"]]])
        for name in NETWORKS:
            for value, curve in zip(values, curves[name]):
                writer.writerow([f"{value:.6g}", name, *[f"{a:.4f}" for a in curve]])
    figure = plot(out)
    print(table(summary))
    print(f"figure: {figure}\nmetrics: {out / 'metrics.csv'}")
    return summary


def table(summary: dict) -> str:
    axis, values = summary["axis"], summary["values"]
    w = max(10, len(axis))
    lines = [f"{axis:>{w}}{'without BN':>12}{'with BN':>10}"]
    for value, plain, bn in zip(values, summary["final"]["plain"], summary["final"]["bn"]):
        lines.append(f"{value:>{w}.2g}{plain:>12.4f}{bn:>10.4f}")
    learned = {name: sum(a > LEARNED for a in summary["final"][name]) for name in NETWORKS}
    lines.append(f"final training accuracy above {LEARNED}: without BN at {learned['plain']} of "
                 f"{len(values)} values of the {axis}, with BN at {learned['bn']}")
    return "\n".join(lines)


PANEL_TITLES = {"init std": "W ~ N(0, {:.2g}$^2$)", "learning rate": "learning rate {:.2g}"}


def plot(run_dir) -> Path:
    """The textbook's grid: training accuracy per epoch, one panel per value, with and without BN."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    summary = runs.read_metrics(run_dir)
    values, epochs, axis = summary["values"], summary["epochs"], summary["axis"]
    cols = math.ceil(math.sqrt(len(values)))
    rows = math.ceil(len(values) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), sharex=True, sharey=True, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(values):  # an empty cell in the last row: the panel above it gets the epoch axis
            ax.set_visible(False)
            axes[k // cols - 1][k % cols].tick_params(labelbottom=True)
            axes[k // cols - 1][k % cols].set_xlabel("epoch")
            continue
        ax.plot(epochs, summary["train_accuracy"]["bn"][k], "-", color="tab:blue", label="with BN")
        ax.plot(epochs, summary["train_accuracy"]["plain"][k], "--", color="tab:gray", label="without BN")
        ax.set_title(PANEL_TITLES.get(axis, axis + " {:.2g}").format(values[k]), fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("train accuracy")
    fig.suptitle(f"Training accuracy against the {axis}, with and without BN")
    fig.tight_layout()
    # (in the figure's corner, beside the title: inside a panel it covered a curve)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper left", fontsize=8, frameon=False)
    return runs.save_figure(fig, run_dir, dpi=110)
