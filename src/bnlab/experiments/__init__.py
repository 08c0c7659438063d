"""One module per paper figure or table: a frozen ``Config``, ``run(cfg)``, ``plot(run_dir)``."""

from bnlab.experiments import bn_mnist, hparam_search, init_sweep, lr_sweep, regularization, small_batch
from bnlab.experiments.runs import ConfigError as ConfigError

EXPERIMENTS = {"bn-mnist": bn_mnist, "small-batch": small_batch, "init-sweep": init_sweep, "lr-sweep": lr_sweep,
               "regularization": regularization, "hparam-search": hparam_search}


def experiment_of(run_dir):
    """The experiment module that wrote ``run_dir`` (its config.json names it)."""
    import json
    from pathlib import Path

    record = json.loads((Path(run_dir) / "config.json").read_text())
    return EXPERIMENTS[record.get("experiment", "bn-mnist")]
