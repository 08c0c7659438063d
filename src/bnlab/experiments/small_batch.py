"""Small-batch normalization: test accuracy against batch size, as in the CBN paper's comparison.

Yao et al. 2020 (Cross-Iteration BN) compare BN, Group Norm, Batch Renorm, naive CBN and CBN as the
per-step batch shrinks (their ImageNet table; Wu & He 2018 show the same collapse of BN). Here a
small convolutional network learns MNIST (or any IDX dataset in MNIST's layout, or the bundled
digits) with each method at batch sizes 32, 16, 8, 4 and 2. Every run sees the same number of
training examples (so smaller batches take more steps), with plain SGD with momentum at a learning
rate scaled linearly with the batch size (base_lr at batch 32). Each run is evaluated once at its
end on the whole test set in inference mode, twice: with the running statistics the layers kept
(an exponential average, momentum 0.1, of the last batches' statistics, taken at older weights),
and with population statistics at the final weights (Ioffe & Szegedy's Algorithm 2,
:func:`bnlab.recalibrate`, over training batches of the run's size drawn by a generator of their
own). Batch Renorm keeps its moving averages in both (they are part of its training); Group Norm
has none.

Network (:class:`SmallConvNet`): three conv3x3 - norm - ReLU - maxpool2 stages (16, 32, 64 channels),
then linear(64*4*4 -> 128) - norm - ReLU - linear(128 -> classes); adaptive pooling to 4x4 makes
it size-agnostic (the 8x8 digits).
Methods: "bn" (bnlab.BatchNorm2d), "gn" (torch.nn.GroupNorm, 4 groups), "brn" (bnlab.BatchRenorm2d,
the paper's schedule scaled to the run: warm-up 5% of the steps, r_max 3 at 40%, d_max 5 at 25%),
"cbn-naive" and "cbn" (bnlab.CrossIterationBatchNorm2d, window 4, burn-in 50% of the steps).
``lr_drop`` (``--lr-drop 0.1``) multiplies every method's learning rate by that factor from the
burn-in's end on, as the official CBN detection configs do (CBN from the 1x schedule's first 10x
drop); the default 1 keeps it constant.
"""

from __future__ import annotations

import csv
import gc
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import bnlab
from bnlab.data import Dataset, load_dataset
from bnlab.experiments import runs
from bnlab.experiments.runs import ConfigError
from bnlab.modules.model import population_layers
from bnlab.train import LoopConfig, fit, has_checkpoint

EXPERIMENT = "small-batch"
METHODS = ("bn", "gn", "brn", "cbn-naive", "cbn")
POPULATION_EXAMPLES = 4096  # training examples (at least 50 batches) behind the population statistics


@dataclass(frozen=True)
class Config:
    out: str | None = None  # run directory; default runs/small-batch-<time>
    data_dir: str | None = None  # MNIST or any IDX dataset in its layout; else $BNLAB_DATA, cache, digits
    download: bool = False  # download MNIST (MD5-checked) when it is not found
    batch_sizes: str = "32,16,8,4,2"  # per-step batch sizes, comma-separated
    methods: str = ",".join(METHODS)  # normalizers, comma-separated, from: bn gn brn cbn-naive cbn
    examples: int = 60_000  # training examples each run sees (steps = examples / batch size)
    base_lr: float = 0.02  # SGD learning rate at batch 32; scaled linearly with the batch size
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # SGD weight decay (L2) on every parameter (5e-4 and 5e-3 hurt CBN here)
    window: int = 4  # CBN: iterations pooled (the official code's 4)
    # (the official detection config: 8 of 12 epochs; 0.1 made CBN unstable here)
    burn_in: float = 0.5  # CBN: fraction of the steps run as plain BN first
    # (the official CBN detection config starts CBN where its schedule divides the learning rate by 10)
    lr_drop: float = 1.0  # learning rate multiplied by this from the burn-in's end on, for every method
    seed: int = 0  # initial weights and batch order (the same for every method at a batch size)
    checkpoint_every: int = 2_000  # steps between checkpoints of a run
    nproc: int = 1  # > 1: also train "syncbn", each batch split over this many gloo processes

    def __post_init__(self):
        # (batch 2 at least: the fully connected layer's BN sees one value per example)
        runs.check(self, examples=runs.at_least(max(self.batches()), "the largest batch size"), base_lr=runs.POSITIVE,
                   momentum=runs.within(0, 1, open_high=True), weight_decay=runs.NON_NEGATIVE,
                   window=runs.POSITIVE, burn_in=runs.within(0, 1),
                   lr_drop=runs.within(0, 1, open_low=True), seed=runs.NON_NEGATIVE,
                   checkpoint_every=runs.POSITIVE, nproc=runs.POSITIVE)
        self.method_names()
        uneven = [b for b in self.batches() if b % self.nproc]
        if uneven:
            raise ConfigError(f"--nproc {self.nproc} must divide every batch size (got {uneven[0]})")

    def batches(self) -> list[int]:
        sizes = runs.parse_list(self, "batch_sizes", int, unique=True)
        if min(sizes) < 2:
            raise ConfigError(f"--batch-sizes must each be at least 2 (BN after the fully connected layer needs "
                              f"two examples), got {self.batch_sizes!r}")
        return sizes

    def method_names(self) -> list[str]:
        return runs.parse_list(self, "methods", choices=METHODS, what="method", unique=True)

    def quick(self) -> "Config":
        """A few hundred steps per run: the demo and CI."""
        return replace(self, examples=1_600, batch_sizes="16,4", checkpoint_every=10_000)


def norm_layer(method: str, channels: int, steps: int, cfg: Config, dims: int = 2) -> nn.Module:
    """The method's normalization of ``channels`` features: after a Conv2d (``dims=2``) or a Linear (1)."""
    if method == "syncbn":
        return bnlab.SyncBatchNorm(channels)
    if method == "bn":
        return (bnlab.BatchNorm1d, bnlab.BatchNorm2d)[dims - 1](channels)
    if method == "gn":
        return nn.GroupNorm(4, channels)
    if method == "brn":
        return (bnlab.BatchRenorm1d, bnlab.BatchRenorm2d)[dims - 1](
            channels, warmup=int(0.05 * steps), r_max_steps=int(0.4 * steps), d_max_steps=int(0.25 * steps))
    if method in ("cbn", "cbn-naive"):
        return (bnlab.CrossIterationBatchNorm1d, bnlab.CrossIterationBatchNorm2d)[dims - 1](
            channels, window=cfg.window, burn_in=int(cfg.burn_in * steps), compensate=method == "cbn")
    raise ConfigError(f"unknown method {method!r}; choose from {METHODS}")


class SmallConvNet(nn.Module):
    """Three conv3x3-norm-ReLU-maxpool stages (16, 32, 64 channels: 28 -> 14 -> 7 -> 4 pixels), a
    fully connected layer of 128 with its own normalization, and a linear classifier.

    The last two normalizations see few values per channel at a small batch (a 7x7 map; one value
    per example after the fully connected layer), as the late stages of the CBN paper's ImageNet
    networks do: that is where batch statistics get noisy.
    """

    def __init__(self, method: str, steps: int, cfg: Config, classes: int):
        super().__init__()
        widths = (1, 16, 32, 64)
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(norm_layer(method, o, steps, cfg) for o in widths[1:])
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(64 * 4 * 4, 128, bias=False)
        self.fc_norm = norm_layer(method, 128, steps, cfg, dims=1)
        self.head = nn.Linear(128, classes)
        for norm, producer in (*zip(self.norms, self.convs), (self.fc_norm, self.fc)):
            if isinstance(norm, bnlab.CrossIterationBatchNorm):
                norm.pair(producer)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = nn.functional.max_pool2d(torch.relu(norm(conv(x))), 2, ceil_mode=True)
        x = torch.relu(self.fc_norm(self.fc(self.pool(x).flatten(1))))
        return self.head(x)


class RunTask:
    """One (method, batch size) run for :func:`bnlab.train.fit`.

    With ``world > 1`` (the "syncbn" method) this process is rank ``rank`` of a gloo group: every
    rank draws the same batch and trains on its own slice of it, SyncBatchNorm pools the
    statistics over the slices and DistributedDataParallel averages the gradients, so the
    training is the whole batch's.
    """

    def __init__(self, cfg: Config, method: str, batch: int, data: Dataset, rank: int = 0, world: int = 1):
        self.batch, self.rank, self.world = batch, rank, world
        self.steps = max(1, cfg.examples // batch)
        side = data.image_shape
        to_images = lambda a: torch.from_numpy(a.reshape(-1, 1, *side).astype(np.float32) / 255.0)  # noqa: E731
        self.x_train, self.y_train = to_images(data.x_train), torch.from_numpy(data.y_train)
        self.x_test, self.y_test = to_images(data.x_test), torch.from_numpy(data.y_test)
        torch.manual_seed(cfg.seed)
        self.model = bnlab.name_layers(SmallConvNet(method, self.steps, cfg, data.num_classes))
        self.module = self.model
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(self.model)
        self.lr, self.lr_drop = cfg.base_lr * batch / 32, cfg.lr_drop
        self.drop_at = int(cfg.burn_in * self.steps)  # (the step CBN starts pooling at: norm_layer's burn-in)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)

    def train_step(self, step: int) -> None:
        for group in self.opt.param_groups:  # (from the step alone: a resumed run follows the same schedule)
            group["lr"] = self.lr * (self.lr_drop if step >= self.drop_at else 1.0)
        i = torch.randint(0, len(self.x_train), (self.batch,), generator=self.sampler)[self.rank :: self.world]
        loss = nn.functional.cross_entropy(self.model(self.x_train[i]), self.y_train[i])
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        if step == 0:
            return {}
        result = {"test_accuracy": self._test_accuracy()}
        if step == self.steps and not population_layers(self.module):  # (Group Norm, Batch Renorm: none to recompute)
            result["test_accuracy_population"] = result["test_accuracy"]
        elif step == self.steps:  # the end of the run: also with Algorithm 2's population statistics
            kept = {k: v.clone() for k, v in self.module.state_dict().items()}
            draw = torch.Generator().manual_seed(12345)
            n = max(50, -(-POPULATION_EXAMPLES // self.batch))
            batches = (self.x_train[torch.randint(0, len(self.x_train), (self.batch,), generator=draw)]
                       for _ in range(n))
            try:
                bnlab.recalibrate(self.module, batches)
                result["test_accuracy_population"] = self._test_accuracy()
            finally:
                self.module.load_state_dict(kept)  # training (or a resume) goes on from the kept statistics
        return result

    def _test_accuracy(self) -> float:
        with bnlab.evaluating(self.model):
            correct = sum(int((self.model(x).argmax(1) == y).sum())
                          for x, y in zip(self.x_test.split(1000), self.y_test.split(1000)))
        return correct / len(self.x_test)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.module.state_dict().items()}
        for k, p in enumerate(self.model.parameters()):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{k}"] = buf
        return {**state, "rng.sampler": self.sampler.get_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        for k, p in enumerate(self.model.parameters()):
            if f"momentum.{k}" in tensors:
                self.opt.state[p]["momentum_buffer"] = tensors[f"momentum.{k}"].clone()
        self.sampler.set_state(tensors["rng.sampler"])


def run(cfg: Config, resume: bool = False) -> dict:
    """Train every (method, batch size) run; write the table, metrics and figure into ``cfg.out``."""
    cfg = runs.with_out(cfg, EXPERIMENT)
    out = runs.claim(cfg.out, resume)
    data = load_dataset(cfg.data_dir, cfg.download)
    print(f"data: {data.source} ({len(data.x_train)} train, {len(data.x_test)} test)")
    runs.record(out, EXPERIMENT, cfg, data.source)
    batches, methods = cfg.batches(), cfg.method_names()
    if cfg.nproc > 1:
        methods.append("syncbn")
    results = {}
    for batch in batches:
        for method in methods:
            if method == "syncbn":
                (out / f"syncbn-b{batch}" / "store").unlink(missing_ok=True)  # a store left by an earlier run
                try:
                    torch.multiprocessing.spawn(_sync_worker, args=(cfg, batch, data, resume), nprocs=cfg.nproc)
                except torch.multiprocessing.ProcessRaisedException as err:
                    refusal = runs.worker_refusal(str(err))
                    if refusal is None:
                        raise
                    raise refusal from None
                rows = json.loads((out / f"syncbn-b{batch}" / "rows.json").read_text())
            else:
                rows = _train(cfg, method, batch, data, resume)
            results[f"{method}-b{batch}"] = rows[-1]
    summary = {"batch_sizes": batches, "methods": methods,
               **{key: {m: {str(b): results[f"{m}-b{b}"].get(metric) for b in batches} for m in methods}
                  for key, metric in (("accuracy", "test_accuracy"),
                                      ("accuracy_population", "test_accuracy_population"))}}
    runs.write_metrics(out, summary)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "statistics", *[f"batch {b}" for b in batches]])
        for key, label in (("accuracy", "running"), ("accuracy_population", "population")):
            for m in methods:
                writer.writerow([m, label, *[summary[key][m][str(b)] for b in batches]])
    figure = plot(out)
    print(table(summary))
    print(f"figure: {figure}\nmetrics: {out / 'metrics.csv'}")
    return summary


def _train(cfg: Config, method: str, batch: int, data: Dataset, resume: bool, rank: int = 0, world: int = 1):
    task = RunTask(cfg, method, batch, data, rank, world)
    folder = Path(cfg.out) / f"{method}-b{batch}" / (f"rank{rank}" if world > 1 else "")
    loop = LoopConfig(task.steps, task.steps, cfg.checkpoint_every, folder, desc=f"{method} batch {batch}")
    resuming = resume and has_checkpoint(loop.out)
    rows = fit(task, loop, resume=resuming, progress=None if rank == 0 else (lambda n: None))
    if "test_accuracy_population" not in rows[-1]:  # finished before this metric existed: from its checkpoint
        rows[-1].update(task.evaluate(task.steps))
    return rows


def _sync_worker(rank: int, cfg: Config, batch: int, data: Dataset, resume: bool) -> None:
    """One rank of the "syncbn" method: a gloo group over a file store in the run folder."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = Path(cfg.out) / f"syncbn-b{batch}" / "store"
    store.parent.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{store.resolve()}", rank=rank, world_size=cfg.nproc)
    try:
        rows = _train(cfg, "syncbn", batch, data, resume, rank, cfg.nproc)
        if rank == 0:
            (store.parent / "rows.json").write_text(json.dumps(rows))
    finally:
        # DDP's reducer (the task's, out of scope) before the group: freed after it, by a later
        # collection, it destroys the group holding the GIL that gloo's thread waits for, a hang
        # seen in torch's teardown (tests/test_distributed.py)
        gc.collect()
        dist.destroy_process_group()


def table(summary: dict) -> str:
    lines = []
    for key, title in (("accuracy", "test accuracy, running statistics"),
                       ("accuracy_population", "test accuracy, population statistics (Algorithm 2)")):
        lines += [title, f"{'':<14}" + "".join(f"{'batch ' + str(b):>10}" for b in summary["batch_sizes"])]
        for m in summary["methods"]:
            cells = (summary[key][m][str(b)] for b in summary["batch_sizes"])
            lines.append(f"{m:<14}" + "".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells))
    return "\n".join(lines)


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config, EXPERIMENT)


def plot(run_dir) -> Path:
    """Test accuracy against batch size, one line per method (the CBN paper's comparison)."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    summary = runs.read_metrics(run_dir)
    batches = summary["batch_sizes"]
    panels = [("accuracy", "running statistics")]
    if any(v is not None for by_batch in summary.get("accuracy_population", {}).values() for v in by_batch.values()):
        panels.append(("accuracy_population", "population statistics (Algorithm 2)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), sharey=True, squeeze=False)
    styles = {"bn": "o-", "gn": "s--", "brn": "^-.", "cbn-naive": "v:", "cbn": "D-"}
    for ax, (key, name) in zip(axes[0], panels):
        for m in summary["methods"]:
            values = [summary[key][m][str(b)] for b in batches]
            ax.plot(batches, [100 * v if v is not None else float("nan") for v in values], styles.get(m, "o-"),
                    label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.invert_xaxis()
        ax.set(xlabel="batch size per step", title=f"inference with {name}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend()
    cfg = load_config(run_dir)
    schedule = f"; learning rate x{cfg.lr_drop:g} after the burn-in" if cfg.lr_drop != 1 else ""
    fig.suptitle(f"Normalizers at small batch sizes (same examples seen{schedule})")
    fig.tight_layout()
    return runs.save_figure(fig, run_dir, dpi=120)
