"""Shared test helpers: float64 by default, and where the shared MNIST files live."""

import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported, and torch.compile (tests/test_compile.py)
# imports it too: set it here, before any test module, so the Triton tests run their kernels on the
# CPU whichever module imports Triton first (BNLAB_TEST_DEVICE=cuda runs them on a GPU instead).
if os.environ.get("BNLAB_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def rel_err(actual, expected) -> float:
    """max |a - e| / max(|e|, tiny): one number per comparison, scale-free."""
    a = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300))


def conv_net(norm: torch.nn.Module, channels: int = 8) -> torch.nn.Sequential:
    """conv3x3 (3 input channels) - ``norm`` - ReLU: the small model the compile, export and
    torch.func tests put each layer in."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1, bias=False), norm, torch.nn.ReLU())


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR} (the team's shared data folder)")
    return MNIST_DIR
