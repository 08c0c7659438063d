"""Ioffe & Szegedy 2015, section 4.1 and Figure 1: the MNIST experiment, with and without BN.

Protocol (the paper's, with what it leaves unstated chosen here and marked so in ``Config``):
28x28 binary inputs; 3 fully connected hidden layers of 100 sigmoid units, y = g(Wu + b), W from a
small Gaussian; a 10-way output with cross-entropy; 50,000 steps of 60 examples. The BN network is
the same with BN before every sigmoid (bias dropped). Both start from the same weights and see the
same mini-batches. Recorded every ``eval_every`` steps: the test accuracy (BN in inference mode,
moving averages) and the 15th/50th/85th percentiles of the input to one sigmoid of the last
hidden layer over a fixed held-out batch. At the end the BN network is also evaluated with
population statistics (Algorithm 2, :func:`bnlab.recalibrate`).

The two networks train in two processes of one thread each (this protocol is bound by per-step
overhead and the 784x100 first layer, so the two cores are best used side by side), each step
through :func:`bnlab.nets.sgd_step`.
"""

from __future__ import annotations

import csv
import queue as queue_lib
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import bnlab
from bnlab.data import Dataset, DataError, load_dataset
from bnlab.experiments import runs
from bnlab.modules import evaluating, recalibrate
from bnlab.kernels.binary_linear import active_lists, warm_up
from bnlab.nets import BinaryInputSGD, SigmoidMLP, flat_active_inputs
from bnlab.train import CHECKPOINT, CheckpointError, LoopConfig, fit, has_checkpoint, load_checkpoint

EXPERIMENT = "bn-mnist"
NETS = ("baseline", "bn")
QUANTILES = (0.15, 0.50, 0.85)


@dataclass(frozen=True)
class Config:
    out: str | None = None  # run directory (config, metrics, checkpoints, figure); default runs/bn-mnist-<time>
    data_dir: str | None = None  # MNIST folder; else $BNLAB_DATA, ~/.cache/bnlab/mnist, else sklearn digits
    download: bool = False  # download MNIST (MD5-checked) when it is not found
    steps: int = 50_000  # paper: 50,000 training steps
    batch_size: int = 60  # paper: 60 examples per mini-batch
    depth: int = 3  # paper: 3 fully connected hidden layers
    width: int = 100  # paper: 100 sigmoid units each
    init_std: float = 0.03  # unstated ("small random Gaussian"): weights ~ N(0, init_std^2)
    lr: float = 0.5  # unstated: plain SGD, constant learning rate, no momentum or weight decay
    threshold: int = 128  # binary inputs: pixel >= threshold (0..255) is 1
    eval_every: int = 500  # steps between evaluations of test accuracy and percentiles
    checkpoint_every: int = 5_000  # steps between checkpoints (one more at the end)
    probe_examples: int = 1_000  # the fixed held-out batch for the percentiles: the first test images
    unit: int = 0  # which sigmoid of the last hidden layer the percentiles follow
    recalibration_batches: int = 250  # training batches for Algorithm 2's population statistics
    seed: int = 0  # initial weights and the mini-batch sequence, shared by both networks
    workers: int = 2  # processes: 2 trains the networks side by side; 1 in this process, one after the other

    def __post_init__(self):
        runs.check(self, steps=runs.POSITIVE, batch_size=runs.at_least(2), depth=runs.POSITIVE, width=runs.POSITIVE,
                   init_std=runs.POSITIVE, lr=runs.POSITIVE, threshold=runs.within(1, 255),
                   eval_every=runs.POSITIVE, checkpoint_every=runs.POSITIVE, probe_examples=runs.POSITIVE,
                   unit=runs.within(0, self.width - 1), recalibration_batches=runs.POSITIVE,
                   seed=runs.NON_NEGATIVE, workers=runs.within(1, 2))

    def quick(self) -> "Config":
        """A few thousand steps: the demo and CI."""
        return replace(self, steps=3_000, eval_every=100, checkpoint_every=1_000, recalibration_batches=100)


@dataclass(frozen=True)
class Tensors:
    """The data as the training step wants it, built once and shared with the training processes."""

    index_train: torch.Tensor  # each training image's active pixels, one flat list (active_lists)
    starts_train: torch.Tensor  # (N + 1,): image i's are index_train[starts[i]:starts[i + 1]]
    onehot_train: torch.Tensor  # (N, classes)
    index_test: torch.Tensor  # flat_active_inputs of the binary test images
    offsets_test: torch.Tensor
    y_test: torch.Tensor  # (N_test,) int64
    num_inputs: int
    num_classes: int

    @classmethod
    def build(cls, data: Dataset, threshold: int) -> "Tensors":
        index, starts = active_lists(data.x_train >= threshold)
        x_test = torch.from_numpy(data.x_test >= threshold).float()
        onehot = torch.nn.functional.one_hot(torch.from_numpy(data.y_train), data.num_classes).float()
        return cls(torch.from_numpy(index), torch.from_numpy(starts), onehot, *flat_active_inputs(x_test),
                   torch.from_numpy(data.y_test), data.x_train.shape[1], data.num_classes)


class NetTask:
    """One of the two networks, trained by :func:`bnlab.train.fit`."""

    def __init__(self, cfg: Config, name: str, data: Tensors):
        self.cfg = cfg
        self.name = name
        self.data = data
        sizes = (data.num_inputs, *[cfg.width] * cfg.depth, data.num_classes)
        init = torch.Generator().manual_seed(cfg.seed)
        net = SigmoidMLP(sizes, batch_norm=name == "bn", init_std=cfg.init_std, generator=init)
        self.model = bnlab.name_layers(net)
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        self.sgd = BinaryInputSGD(self.model, cfg.lr, data.index_train, data.starts_train)

    def train_step(self, step: int) -> None:
        ids = torch.randint(0, len(self.data.onehot_train), (self.cfg.batch_size,), generator=self.sampler)
        self.sgd.step(ids, self.data.onehot_train.index_select(0, ids))

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        self.sgd.sync_()
        with evaluating(self.model):
            d, probe = self.data, slice(0, self.cfg.probe_examples)
            logits, sigmoid_inputs = self.model.head(self.sgd.first_layer(d.index_test, offsets=d.offsets_test), True)
            accuracy = float((logits.argmax(1) == d.y_test).float().mean())
            u = sigmoid_inputs[-1][probe, self.cfg.unit]
            if not torch.isfinite(u).all():
                raise FloatingPointError(f"{self.name}: training diverged (non-finite values) by step {step}")
            p15, p50, p85 = torch.quantile(u, torch.tensor(QUANTILES)).tolist()
        return {"test_accuracy": accuracy, "p15": p15, "p50": p50, "p85": p85}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.sgd.sync_()
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        return {**state, "rng.sampler": self.sampler.get_state()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.sampler.set_state(tensors["rng.sampler"])
        self.sgd.reload_()


@torch.no_grad()
def test_accuracy(model, data: Tensors, sgd: BinaryInputSGD) -> float:
    logits = model.head(sgd.first_layer(data.index_test, offsets=data.offsets_test))
    return float((logits.argmax(1) == data.y_test).float().mean())


def loop_config(cfg: Config, name: str) -> LoopConfig:
    return LoopConfig(cfg.steps, cfg.eval_every, cfg.checkpoint_every, Path(cfg.out) / name, desc=name)


def _train_one(cfg: Config, name: str, resume: bool, data: Tensors, progress=None):
    task = NetTask(cfg, name, data)
    can_resume = resume and has_checkpoint(Path(cfg.out) / name)
    return fit(task, loop_config(cfg, name), resume=can_resume, progress=progress)


def _worker(cfg: Config, name: str, resume: bool, data: Tensors, messages) -> None:
    """Entry of a training process: one thread, progress and result through ``messages``."""
    import threadpoolctl

    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)
    try:
        metrics = _train_one(cfg, name, resume, data, progress=lambda n: messages.put(("progress", name, n)))
        messages.put(("done", name, metrics))
    except KeyboardInterrupt as err:
        messages.put(("interrupted", name, str(err)))
    except (CheckpointError, DataError, runs.ConfigError) as err:  # the parent raises it as it is: one line
        messages.put(("refused", name, err))
    except BaseException:  # reported to the parent, which raises
        messages.put(("error", name, traceback.format_exc()))


def train_both(cfg: Config, resume: bool, data: Tensors) -> dict[str, list[dict]]:
    """Train both networks, side by side (``workers=2``) or one after the other; one progress bar."""
    from tqdm.auto import tqdm

    results: dict[str, list[dict]] = {}
    if cfg.workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the workers: the same arithmetic, so the same numbers
        try:
            with tqdm(total=2 * cfg.steps, desc="baseline + bn", unit="step", dynamic_ncols=True) as bar:
                for name in NETS:
                    results[name] = _train_one(cfg, name, resume, data, progress=bar.update)
        finally:
            torch.set_num_threads(threads)
        return results
    # fork: the workers start at once, with the kernels compiled, and share the tensors copy-on-write.
    warm_up()
    ctx = torch.multiprocessing.get_context("fork")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, name, resume, data, messages), daemon=True) for name in NETS]
    for p in procs:
        p.start()
    problems = []
    runs.pyplot()  # the figure needs it later, and this process is idle now

    with tqdm(total=2 * cfg.steps, desc="baseline + bn", unit="step", dynamic_ncols=True) as bar:
        while len(results) + len(problems) < len(NETS):
            try:
                kind, name, payload = messages.get(timeout=1.0)
            except queue_lib.Empty:
                if not any(p.is_alive() for p in procs) and messages.empty():
                    codes = [p.exitcode for p in procs]
                    problems.append(("error", "worker", f"a training process died without a word (exit codes {codes})"))
                continue
            except KeyboardInterrupt:
                continue  # the workers got the signal too: wait for them to save and report
            if kind == "progress":
                bar.update(payload)
            elif kind == "done":
                results[name] = payload
            else:
                problems.append((kind, name, payload))
                if kind in ("error", "refused"):  # the other network's result would be of no use
                    for p in procs:
                        p.terminate()
                    break
    for p in procs:
        p.join()
    for kind, name, payload in problems:
        if kind == "interrupted":
            raise KeyboardInterrupt(payload)
        if kind == "refused":
            raise payload
        raise RuntimeError(f"training {name} failed:\n{payload}")
    return results


def drift(rows: list[dict]) -> float:
    """Mean over the 15/50/85th percentiles of their range (max - min) over the evaluations after step 0.

    In the units of the sigmoid's input: how far the distribution of the sigmoid's input wanders
    while the network trains (the paper: without BN it changes "both in their mean and the
    variance"). Step 0 is left out: there both networks have the same weights, and BN's moving
    averages still hold their initial values.
    """
    later = [r for r in rows if r["step"] > 0]
    curves = np.array([[r[k] for r in later] for k in ("p15", "p50", "p85")])
    return float((curves.max(axis=1) - curves.min(axis=1)).mean())


def final_population_accuracy(cfg: Config, data: Tensors) -> float:
    """The trained BN network evaluated with Algorithm 2's population statistics."""
    task = NetTask(cfg, "bn", data)
    tensors, _, _ = load_checkpoint(Path(cfg.out) / "bn" / CHECKPOINT)
    task.load_state_tensors(tensors)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    batches = (torch.randint(0, len(data.onehot_train), (cfg.batch_size,), generator=g)
               for _ in range(cfg.recalibration_batches))
    recalibrate(task.model, batches, forward=lambda model, ids: model.head(task.sgd.first_layer_of(ids)))
    task.model.eval()
    return test_accuracy(task.model, data, task.sgd)


def accuracy_at(rows: list[dict], step: int) -> float | None:
    """Test accuracy at the last evaluation at or before ``step`` (None before the first)."""
    before = [r for r in rows if r["step"] <= step]
    return before[-1]["test_accuracy"] if before else None


def summarize(cfg: Config, metrics: dict[str, list[dict]], population_accuracy: float) -> dict:
    marks = sorted({min(10_000, cfg.steps), cfg.steps})
    return {
        "steps": cfg.steps,
        "accuracy": {name: {str(s): accuracy_at(metrics[name], s) for s in marks} for name in NETS},
        "bn_population_statistics_accuracy": population_accuracy,
        "percentile_drift": {name: drift(metrics[name]) for name in NETS},
        "drift_measure": drift.__doc__.strip().splitlines()[0],
    }


def write_metrics(out: Path, metrics: dict[str, list[dict]], summary: dict) -> None:
    runs.write_metrics(out, {"nets": metrics, "summary": summary})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["net", "step", "test_accuracy", "p15", "p50", "p85"])
        for name in NETS:
            for r in metrics[name]:
                writer.writerow([name, r["step"], r["test_accuracy"], r["p15"], r["p50"], r["p85"]])


def summary_table(summary: dict) -> str:
    marks = list(summary["accuracy"]["baseline"])
    lines = [f"{'':<22}" + "".join(f"{'acc @ ' + m:>14}" for m in marks) + f"{'drift':>10}"]
    for name in NETS:
        accs = "".join(f"{summary['accuracy'][name][m]:>14.4f}" for m in marks)
        label = name + " (moving avg)" if name == "bn" else name
        lines.append(f"{label:<22}{accs}{summary['percentile_drift'][name]:>10.3f}")
    population = summary["bn_population_statistics_accuracy"]
    lines.append(f"{'bn (Algorithm 2)':<22}{'':>{14 * (len(marks) - 1)}}{population:>14.4f}")
    lines.append(f"drift: {summary['drift_measure']}")
    return "\n".join(lines)


def run(cfg: Config, resume: bool = False) -> dict:
    """Train both networks, write metrics, the summary and the figure into ``cfg.out``."""
    cfg = runs.with_out(cfg, EXPERIMENT)
    out = runs.claim(cfg.out, resume)
    data = load_dataset(cfg.data_dir, cfg.download)
    print(f"data: {data.source} ({len(data.x_train)} train, {len(data.x_test)} test, {data.image_shape} pixels)")
    runs.record(out, EXPERIMENT, cfg, data.source)
    tensors = Tensors.build(data, cfg.threshold)
    metrics = train_both(cfg, resume, tensors)
    summary = summarize(cfg, metrics, final_population_accuracy(cfg, tensors))
    write_metrics(out, metrics, summary)
    figure = plot(out)
    print(summary_table(summary))
    print(f"figure: {figure}\nmetrics: {out / 'metrics.csv'}")
    return summary


def load_config(run_dir) -> Config:
    return runs.load_config(run_dir, Config, EXPERIMENT)


def plot(run_dir) -> Path:
    """Draw Figure 1 (a: test accuracy vs steps; b, c: percentiles without and with BN) from metrics.json."""
    plt = runs.pyplot()
    run_dir = Path(run_dir)
    data = runs.read_metrics(run_dir)
    nets = data["nets"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = {"baseline": "tab:blue", "bn": "tab:red"}
    labels = {"baseline": "Without BN", "bn": "With BN"}
    ax = axes[0]
    for name in NETS:
        steps = [r["step"] for r in nets[name]]
        ax.plot(steps, [r["test_accuracy"] for r in nets[name]], color=colors[name], label=labels[name])
    ax.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    low = min(r["p15"] for n in NETS for r in nets[n])
    high = max(r["p85"] for n in NETS for r in nets[n])
    pad = 0.05 * (high - low or 1.0)
    for ax, name, letter in [(axes[1], "baseline", "b"), (axes[2], "bn", "c")]:
        steps = [r["step"] for r in nets[name]]
        for key, style in [("p85", "--"), ("p50", "-"), ("p15", ":")]:
            ax.plot(steps, [r[key] for r in nets[name]], style, color=colors[name], label=f"{key[1:]}th percentile")
        ax.set(xlabel="training step", ylabel="input to the sigmoid", ylim=(low - pad, high + pad),
               title=f"({letter}) {labels[name]}: input to a last-layer sigmoid")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    summary = data.get("summary")
    if summary:
        fig.suptitle(
            f"Ioffe & Szegedy 2015, Figure 1, reproduced by bnlab ({summary['steps']} steps; "
            f"percentile drift {summary['percentile_drift']['baseline']:.2f} without BN, "
            f"{summary['percentile_drift']['bn']:.2f} with BN)"
        )
    fig.tight_layout()
    return runs.save_figure(fig, run_dir, dpi=120)
