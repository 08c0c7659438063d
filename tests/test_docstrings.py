"""Every example in bnlab's docstrings runs and prints what it shows (doctest, in each module's
own namespace: an example must import what it uses beyond its module's imports)."""

import doctest
import importlib
import pkgutil

import pytest

import bnlab

MODULES = sorted(info.name for info in pkgutil.walk_packages(bnlab.__path__, "bnlab."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (above)"


def test_the_public_layers_show_an_example():
    for name in ("BatchNorm", "BatchNormAct", "BatchRenorm", "GhostBatchNorm", "CrossIterationBatchNorm",
                 "SyncBatchNorm", "convert", "to_torch", "fuse", "cross_iteration", "evaluating", "recalibrate",
                 "is_batch_norm", "name_layers"):
        assert ">>>" in getattr(bnlab, name).__doc__, name
