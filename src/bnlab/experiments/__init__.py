"""One module per paper figure or table: a frozen ``Config``, ``run(cfg)``, ``plot(run_dir)``."""

from bnlab.experiments import bn_mnist

EXPERIMENTS = {"bn-mnist": bn_mnist}
