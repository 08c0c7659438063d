"""Weight-initialization sensitivity: training accuracy with and without BN across init scales.

The textbook treatment of BN (Saito, Deep Learning from Scratch, chapter 6) trains the same
fully connected ReLU network, Affine -> (BN) -> ReLU five times then a softmax layer, from weights
drawn from N(0, std^2) for 16 values of std from 1 down to 1e-4 (log-spaced), on the first 1,000
MNIST training images: plain SGD at learning rate 0.01, mini-batches of 100 drawn with replacement,
20 epochs of 10 steps. Training accuracy is measured after every epoch in inference mode (BN with
its running statistics). The claim: with BN the network learns at almost every scale; without it,
most scales never leave chance (activations vanish or explode through the layers).

Here each std trains both networks from the same initial weights on the same batches (the BN
network drops the biases that BN's beta replaces, as Ioffe & Szegedy do). BN is
:class:`bnlab.BatchNorm1d` with the textbook's epsilon (1e-6) and momentum (0.9 kept, 0.1 in torch's
convention); its running variance starts at 1 (torch's), where the textbook's starts at 0, which
changes only the first epochs' evaluations. Every run goes through :func:`bnlab.train.fit`; the
figure is the textbook's 4x4 grid, one panel per std.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab.data import Dataset, load_dataset
from bnlab.experiments import runs
from bnlab.experiments.runs import ConfigError
from bnlab.train import LoopConfig, fit


@dataclass(frozen=True)
class Config:
    out: str | None = None  # run directory; default runs/init-sweep-<time>
    data_dir: str | None = None  # MNIST or any IDX dataset in its layout; else $BNLAB_DATA, cache, digits
    download: bool = False  # download MNIST (MD5-checked) when it is not found
    train_examples: int = 1_000  # the first this many training images are the whole training set
    stds: int = 16  # init stds, log-spaced from 10^std_log10_max down to 10^std_log10_min
    std_log10_max: float = 0.0  # largest std: 10^this
    std_log10_min: float = -4.0  # smallest std: 10^this
    hidden_layers: int = 5  # Affine -> (BN) -> ReLU blocks before the softmax layer
    width: int = 100  # units per hidden layer
    lr: float = 0.01  # plain SGD learning rate
    batch: int = 100  # mini-batch, drawn with replacement
    epochs: int = 20  # evaluations; an epoch is train_examples / batch steps
    eps: float = 1e-6  # BN's epsilon (the textbook's; torch's default is 1e-5)
    seed: int = 0  # initial weights (shared by the two networks at a std) and batch order

    def quick(self) -> "Config":
        """Four stds for a few epochs: the demo and CI."""
        return replace(self, stds=4, epochs=4)

    def std_values(self) -> list[float]:
        return [float(s) for s in np.logspace(self.std_log10_max, self.std_log10_min, self.stds)]


def mlp(inputs: int, classes: int, cfg: Config, batch_norm: bool) -> nn.Sequential:
    """Affine -> (BN) -> ReLU, ``cfg.hidden_layers`` times, then Affine (softmax in the loss)."""
    layers, width = [], inputs
    for _ in range(cfg.hidden_layers):
        layers += [nn.Linear(width, cfg.width, bias=not batch_norm)]
        layers += [bnlab.BatchNorm1d(cfg.width, eps=cfg.eps)] if batch_norm else []
        layers += [nn.ReLU()]
        width = cfg.width
    return nn.Sequential(*layers, nn.Linear(width, classes))


def init_weights_(model: nn.Module, std: float, seed: int) -> None:
    """Weights from N(0, std^2), biases zero, drawn layer by layer from ``seed``: a network with
    and one without BN get the same weights (BN's gamma = 1 and beta = 0 are the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * std)
                if layer.bias is not None:
                    layer.bias.zero_()


class SweepTask:
    """One (std, with or without BN) run for :func:`bnlab.train.fit`."""

    def __init__(self, cfg: Config, std: float, batch_norm: bool, x: torch.Tensor, y: torch.Tensor, classes: int):
        self.cfg, self.x, self.y = cfg, x, y
        self.model = bnlab.name_layers(mlp(x.shape[1], classes, cfg, batch_norm))
        init_weights_(self.model, std, cfg.seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)

    def train_step(self, step: int) -> None:
        i = torch.randint(0, len(self.x), (self.cfg.batch,), generator=self.sampler)  # with replacement
        loss = nn.functional.cross_entropy(self.model(self.x[i]), self.y[i])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        self.model.eval()
        try:
            logits = self.model(self.x)
        finally:
            self.model.train()
        loss = nn.functional.cross_entropy(logits, self.y).item()
        return {"train_accuracy": (logits.argmax(1) == self.y).double().mean().item(),
                "train_loss": loss if math.isfinite(loss) else None}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        return {**state, "rng.sampler": self.sampler.get_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.sampler.set_state(tensors["rng.sampler"])


def run(cfg: Config, resume: bool = False) -> dict:
    """Load the data and run the sweep (:func:`sweep`)."""
    data = load_dataset(cfg.data_dir, cfg.download)
    print(f"data: {data.source} ({len(data.x_train)} train images, the first {cfg.train_examples} used)")
    return sweep(cfg, data, resume)


def sweep(cfg: Config, data: Dataset, resume: bool = False) -> dict:
    """Train both networks at every std; write metrics, the table and the figure into ``cfg.out``."""
    if cfg.out is None:
        cfg = replace(cfg, out=time.strftime("runs/init-sweep-%Y%m%d-%H%M%S"))
    if not 0 < cfg.train_examples <= len(data.x_train):
        raise ConfigError(f"--train-examples must be 1..{len(data.x_train)} for {data.name}, got {cfg.train_examples}")
    out = runs.claim(cfg.out, resume)
    runs.record(out, "init-sweep", cfg, data.source)
    x = torch.from_numpy(data.x_train[: cfg.train_examples].astype(np.float32) / 255.0)
    y = torch.from_numpy(data.y_train[: cfg.train_examples])
    steps_per_epoch = max(1, cfg.train_examples // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    stds = cfg.std_values()
    from tqdm.auto import tqdm

    curves = {"bn": [], "plain": []}
    with tqdm(total=2 * len(stds) * steps, desc=f"{2 * len(stds)} runs", unit="step", dynamic_ncols=True) as bar:
        for k, std in enumerate(stds):
            for name in ("plain", "bn"):
                task = SweepTask(cfg, std, name == "bn", x, y, data.num_classes)
                loop = LoopConfig(steps, steps_per_epoch, steps, out / f"std{k:02d}-{name}")
                done = resume and (loop.out / "checkpoint.safetensors").exists()
                rows = fit(task, loop, resume=done, progress=bar.update)
                curves[name].append([row["train_accuracy"] for row in rows])
    summary = {"stds": stds, "epochs": list(range(cfg.epochs + 1)), "train_accuracy": curves,
               "final": {name: [c[-1] for c in curves[name]] for name in curves}}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["std", "network", *[f"epoch {e}" for e in summary["epochs"]]])
        for name in ("plain", "bn"):
            for std, curve in zip(stds, curves[name]):
                writer.writerow([f"{std:.6g}", name, *[f"{a:.4f}" for a in curve]])
    figure = plot(out)
    print(table(summary))
    print(f"figure: {figure}\nmetrics: {out / 'metrics.csv'}")
    return summary


LEARNED = 0.5  # a run "learns" when its final training accuracy passes this (chance is 0.1)


def table(summary: dict) -> str:
    lines = [f"{'init std':>10}{'without BN':>12}{'with BN':>10}"]
    for std, plain, bn in zip(summary["stds"], summary["final"]["plain"], summary["final"]["bn"]):
        lines.append(f"{std:>10.2g}{plain:>12.4f}{bn:>10.4f}")
    learned = {name: sum(a > LEARNED for a in summary["final"][name]) for name in ("plain", "bn")}
    lines.append(f"final training accuracy above {LEARNED}: without BN at {learned['plain']} of "
                 f"{len(summary['stds'])} stds, with BN at {learned['bn']}")
    return "\n".join(lines)


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config)


def plot(run_dir) -> Path:
    """The textbook's grid: training accuracy per epoch, one panel per init std, with and without BN."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    stds, epochs = summary["stds"], summary["epochs"]
    cols = math.ceil(math.sqrt(len(stds)))
    rows = math.ceil(len(stds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), sharex=True, sharey=True, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(stds):
            ax.set_visible(False)
            continue
        ax.plot(epochs, summary["train_accuracy"]["bn"][k], "-", color="tab:blue", label="with BN")
        ax.plot(epochs, summary["train_accuracy"]["plain"][k], "--", color="tab:gray", label="without BN")
        ax.set_title(f"W ~ N(0, {stds[k]:.2g}$^2$)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("train accuracy")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Training accuracy against weight-init scale, with and without BN")
    fig.tight_layout()
    path = run_dir / "figure.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
