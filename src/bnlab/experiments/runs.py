"""What every experiment does with its run folder: refuse to overwrite one, record the config
(with the code version and the data source), read it back for ``--resume``, and draw figures
without a screen."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import textwrap
import time
from pathlib import Path

import bnlab
from bnlab.data import DataError
from bnlab.train import CHECKPOINT, CheckpointError


class ConfigError(ValueError):
    """An experiment's settings that cannot run (the command line says so without a traceback)."""


# Rules for :func:`check`: (test, what a value must be)
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
FINITE = (math.isfinite, "a finite number")


def at_least(low, why: str = ""):
    return (lambda v: v >= low, f"at least {low}" + (f" ({why})" if why else ""))


def within(low, high, *, open_low: bool = False, open_high: bool = False):
    above = (lambda v: v > low) if open_low else (lambda v: v >= low)
    below = (lambda v: v < high) if open_high else (lambda v: v <= high)
    return (lambda v: above(v) and below(v), f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def check(cfg, **rules) -> None:
    """Refuse settings that cannot run before anything runs, naming the flag: ``rules`` map a
    field to a rule, ``(test, what the value must be)``, e.g. ``steps=POSITIVE``, and every value
    must be finite (inf passed "positive"). The configs call it from ``__post_init__``, so the
    command line, ``dataclasses.replace`` and a ``config.json`` read for ``--resume`` are all
    checked."""
    for name, (test, must) in rules.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise ConfigError(f"{flag(name)} must be {must}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{flag(name)} must be {FINITE[1]}, got {value!r}")


def worker_refusal(text: str) -> Exception | None:
    """The refusal (a checkpoint, data or settings error, one line) that a worker process raised,
    rebuilt from the traceback text its parent gets (``torch.multiprocessing.spawn``'s), so the
    command line says it as it says its own; None for any other error."""
    lines = text.strip().splitlines()
    for cls in (CheckpointError, DataError, ConfigError):
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        if lines and lines[-1].startswith(prefix):
            return cls(lines[-1][len(prefix):])
    return None


def check_choice(value, choices, what: str) -> None:
    """Refuse a ``value`` that is not one of ``choices``, naming them (``what``: "method", say)."""
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def parse_list(cfg, name: str, kind=str, choices=None, what: str = "", unique: bool = False) -> list:
    """A comma-separated field as a list of ``kind``; an empty list, a value ``kind`` cannot read,
    one outside ``choices`` (when given; ``what`` names them) or, with ``unique``, one given twice
    (the same runs twice, and one row of the table for both) is refused."""
    text = getattr(cfg, name)
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{flag(name)} takes a comma-separated list of {kind.__name__} values, got {text!r}")
    for value in values if choices is not None else ():
        check_choice(value, choices, what)
    twice = sorted({v for v in values if values.count(v) > 1}, key=values.index) if unique else []
    if twice:
        raise ConfigError(f"{flag(name)} lists {', '.join(map(str, twice))} more than once, got {text!r}")
    return values


def code_version() -> str:
    """bnlab's version, and the git revision when run from a checkout."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"bnlab {bnlab.__version__}" + (f" ({rev})" if rev else "")


def default_out(experiment: str) -> str:
    """A new folder each run, so nothing earlier is overwritten: ``runs/<experiment>-<time>``."""
    return time.strftime(f"runs/{experiment}-%Y%m%d-%H%M%S")


def with_out(cfg, experiment: str):
    """``cfg``, with :func:`default_out` for its run folder when it names none."""
    return cfg if cfg.out is not None else dataclasses.replace(cfg, out=default_out(experiment))


def claim(out: Path, resume: bool, records: tuple[str, ...] = ()) -> Path:
    """Make the run folder ``out``; a folder that holds a run's checkpoints (or one of the files
    named in ``records``) is only ever resumed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; pick another --out")
    if not resume and (any(out.glob(f"**/{CHECKPOINT}")) or any((out / name).exists() for name in records)):
        raise FileExistsError(f"{out} already holds a run; continue it with --resume {out}, or pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # (a file on the path, no permission, a read-only disk)
        raise ConfigError(f"--out {out}: cannot make the run folder ({err.strerror}: {err.filename})") from err
    return out


def record(out: Path, experiment: str, cfg, data_source: str) -> None:
    """``config.json``: what ran, with which settings, code and data (``bnlab plot`` and ``--resume`` read it)."""
    entry = {"experiment": experiment, "config": dataclasses.asdict(cfg), "seed": cfg.seed,
             "code_version": code_version(), "data": data_source}
    (Path(out) / "config.json").write_text(json.dumps(entry, indent=1))


def read_record(run_dir) -> dict:
    """What :func:`record` wrote (``experiment`` filled in for the first runs, which did not record
    it: they were bn-mnist's); a folder that holds no run is refused with what it lacks."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a bnlab run folder: it has no config.json "
                          "(bnlab reproduce writes one when a run starts)")
    try:
        entry = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read: {err}") from err
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
        raise ConfigError(f"{path} holds no run's settings (a 'config' entry)")
    entry.setdefault("experiment", "bn-mnist")
    return entry


def load_config(run_dir, config_cls, experiment: str):
    """The config a run of ``experiment`` recorded; settings this version no longer has are dropped.
    A run of another experiment is refused (its settings would be dropped silently)."""
    entry = read_record(run_dir)
    recorded = entry["experiment"]
    if recorded != experiment:
        raise ConfigError(f"{run_dir} holds a {recorded} run, not {experiment}; continue it with "
                          f"bnlab reproduce {recorded} --resume {run_dir}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in entry["config"].items() if k in known})


def write_metrics(out: Path, summary: dict) -> None:
    """``metrics.json``: a run's results, which :func:`read_metrics` (and ``bnlab plot``) read back."""
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=1))


def read_metrics(run_dir) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        experiment = read_record(run_dir)["experiment"]
        raise ConfigError(f"{run_dir} has no metrics.json: the run has not finished; continue it with "
                          f"bnlab reproduce {experiment} --resume {run_dir}")
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read: {err}") from err
    if not isinstance(summary, dict):
        raise ConfigError(f"{path} holds no run's results (a JSON object)")
    return summary


def save_figure(fig, run_dir, dpi: int) -> Path:
    """``figure.png`` in the run folder, with the data the run recorded as a footnote (a figure
    drawn from scikit-learn's 8x8 digits, the fallback, must not pass for MNIST's); the figure is
    closed."""
    path = Path(run_dir) / "figure.png"
    try:
        source = read_record(run_dir).get("data")
    except ConfigError:  # (no record: a figure drawn outside a run folder)
        source = None
    if source:
        fig.text(0.5, 0.0, textwrap.fill(f"data: {source}", 160), ha="center", va="top", fontsize="small",
                 color="0.35")
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if source else None)
    pyplot().close(fig)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
