"""The one training loop every experiment uses: steps, evaluation, checkpoints, resume, progress.

An experiment hands :func:`fit` a :class:`Task` (what one step does, what an evaluation measures,
and every tensor that must survive a restart: weights, running statistics, optimizer and RNG
state) and a :class:`LoopConfig`. The loop owns the rest:

- evaluation at step 0 and every ``eval_every`` steps, rows collected in ``metrics``;
- checkpoints every ``checkpoint_every`` steps and at the end, in safetensors (never pickle: a
  checkpoint from a stranger cannot run code), written to a temporary file and renamed, so a crash
  or ``kill -9`` mid-write leaves the previous checkpoint intact;
- ``resume=True`` continues from the checkpoint and, with a deterministic task, ends with the same
  metrics as an uninterrupted run;
- Ctrl-C finishes the step under way, saves a checkpoint and raises :class:`Interrupted`;
- progress through a callback (a tqdm bar by default).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint.safetensors"


class Task(Protocol):
    def train_step(self, step: int) -> None:
        """Advance the model by one optimization step (``step`` counts from 0)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Measure the model after ``step`` steps; returns named numbers."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a restart needs, as named tensors (parameters, buffers, RNG states)."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned."""


@dataclass(frozen=True)
class LoopConfig:
    steps: int  # optimization steps in all
    eval_every: int  # evaluate after every this many steps (and at step 0)
    checkpoint_every: int  # write a checkpoint after every this many steps (and at the end)
    out: Path  # folder for the checkpoint
    desc: str = "training"  # label of the progress bar


class _DeferredInterrupt:
    """Ctrl-C sets a flag that the loop reads between steps, so no step is left half done."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame):
        self.requested = True

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not belong to this run."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit`: the checkpoint was saved; ``step`` is where it stands."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}")
        self.step = step
        self.path = path


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], step: int, metrics: list[dict]) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"step": str(step), "metrics": json.dumps(metrics)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def has_checkpoint(folder) -> bool:
    """Whether the run folder ``folder`` (a :class:`LoopConfig`'s ``out``) holds a checkpoint to resume."""
    return (Path(folder) / CHECKPOINT).exists()


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], int, list[dict]]:
    """Read a checkpoint written by :func:`save_checkpoint`; CheckpointError names the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return tensors, int(meta["step"]), json.loads(meta["metrics"])
    except (SafetensorError, KeyError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{path}: the checkpoint is corrupt or not bnlab's ({err}); the run folder is left as it is. "
            "Start a new run with another --out, or delete the file to restart this one"
        ) from err


def fit(
    task: Task,
    cfg: LoopConfig,
    resume: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Run ``task`` for ``cfg.steps`` steps; returns the metric rows ``[{"step": s, ...}, ...]``.

    ``progress(n)`` is called with the number of steps just done (a tqdm bar when None).
    """
    path = Path(cfg.out) / CHECKPOINT
    start, metrics = 0, []
    if resume:
        tensors, start, metrics = load_checkpoint(path)
        try:
            task.load_state_tensors(tensors)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{path}: does not match this run's model ({err})") from err
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.desc, unit="step", dynamic_ncols=True)
        progress = bar.update
    step = start
    stop = _DeferredInterrupt()
    try:
        if step == 0:
            metrics.append({"step": 0, **task.evaluate(0)})
        pending = 0
        while step < cfg.steps:
            task.train_step(step)
            step += 1
            pending += 1
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics.append({"step": step, **task.evaluate(step)})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(path, task.state_tensors(), step, metrics)
            if pending >= 50 or step == cfg.steps:
                progress(pending)
                pending = 0
            if stop.requested:
                save_checkpoint(path, task.state_tensors(), step, metrics)
                raise Interrupted(step, path)
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
    return metrics
