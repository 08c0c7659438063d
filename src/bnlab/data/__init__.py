"""Datasets: the IDX reader, MNIST (local folder, download, or the embedded digits fallback)."""

from bnlab.data.idx import DataError, read_idx, write_idx
from bnlab.data.mnist import Dataset, download_mnist, find_mnist, load_dataset, load_digits, load_mnist

__all__ = [
    "DataError",
    "Dataset",
    "download_mnist",
    "find_mnist",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
    "write_idx",
]
