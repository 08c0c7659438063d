"""Shared test helpers: float64 by default, and where the shared MNIST files live."""

from pathlib import Path

import numpy as np
import pytest
import torch

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def rel_err(actual, expected) -> float:
    """max |a - e| / max(|e|, tiny): one number per comparison, scale-free."""
    a = actual.detach().cpu().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-300))


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST IDX files not found at {MNIST_DIR} (the team's shared data folder)")
    return MNIST_DIR
