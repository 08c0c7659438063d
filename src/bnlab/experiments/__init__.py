"""One module per paper figure or table: a frozen ``Config``, ``run(cfg)``, ``plot(run_dir)``."""

from bnlab.experiments import bn_mnist, hparam_search, init_sweep, lr_sweep, regularization, small_batch
from bnlab.experiments.runs import ConfigError as ConfigError

EXPERIMENTS = {"bn-mnist": bn_mnist, "small-batch": small_batch, "init-sweep": init_sweep, "lr-sweep": lr_sweep,
               "regularization": regularization, "hparam-search": hparam_search}


def experiment_of(run_dir):
    """The experiment module that wrote ``run_dir`` (its config.json names it)."""
    from bnlab.experiments.runs import read_record

    name = read_record(run_dir)["experiment"]
    if name not in EXPERIMENTS:
        raise ConfigError(f"{run_dir} holds a run of {name!r}, which this version of bnlab does not know")
    return EXPERIMENTS[name]
