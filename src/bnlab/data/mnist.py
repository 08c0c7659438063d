"""MNIST from a local folder, a checked download, or the embedded fallback (scikit-learn's digits).

Where MNIST is looked for: ``data_dir`` (``--data-dir``) alone when it is given; otherwise the
folder in the environment variable ``BNLAB_DATA`` (or its ``mnist/`` subfolder), then the cache
``~/.cache/bnlab/mnist``.
Each file may be gzip-compressed (``*.gz``, the published form) or raw; either way its MD5 is
checked against the published one. A folder whose files all differ from MNIST's holds another
dataset in MNIST's layout (Fashion-MNIST, say), read with its structure checked
(:func:`load_mnist`). When none is found and no download is asked for, the 8x8 digits bundled
with scikit-learn stand in, and the caller says so.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab.data.idx import DataError, md5, read_idx

# name -> (md5 of the .gz file, md5 of the raw file)
MNIST_FILES = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
CACHE = Path.home() / ".cache" / "bnlab" / "mnist"


@dataclass(frozen=True)
class Dataset:
    """Images flattened to ``(N, D)`` uint8 in 0..255, labels int64, a train and a test split."""

    name: str
    source: str  # where it came from, said in every run's output
    image_shape: tuple[int, int]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _file_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def find_mnist(data_dir=None) -> Path | None:
    """The first folder holding all four MNIST files, or None. An explicit ``data_dir`` is the only
    place looked at; without one, ``$BNLAB_DATA`` (or its ``mnist/``), then the cache."""
    if data_dir is not None:
        folder = Path(data_dir)
        return folder if all(_file_in(folder, name) for name in MNIST_FILES) else None
    candidates = []
    if os.environ.get("BNLAB_DATA"):
        env = Path(os.environ["BNLAB_DATA"])
        candidates += [env, env / "mnist"]
    candidates.append(CACHE)
    for folder in candidates:
        if all(_file_in(folder, name) for name in MNIST_FILES):
            return folder
    return None


def _expected_md5(path: Path, name: str, files) -> str:
    gz_md5, raw_md5 = files[name]
    return gz_md5 if path.suffix == ".gz" else raw_md5


def load_mnist(folder, files=MNIST_FILES) -> Dataset:
    """Read the four files of MNIST's layout in ``folder``.

    MNIST itself when every file has its published MD5. When none has, the folder holds another
    dataset in the same layout (Fashion-MNIST, KMNIST, your own): it is read with its structure
    checked (IDX headers and sizes, uint8 images, as many labels as images) and its ``source``
    says it is not MNIST. Some files MNIST's and some not is a damaged MNIST copy: refused, naming
    the file.
    """
    folder = Path(folder)
    paths = {}
    for name in files:
        paths[name] = _file_in(folder, name)
        if paths[name] is None:
            raise DataError(f"{folder}: {name}[.gz] is missing")
    actual = {name: md5(path) for name, path in paths.items()}
    wrong = [name for name, path in paths.items() if actual[name] != _expected_md5(path, name, files)]
    if 0 < len(wrong) < len(files):
        path = paths[wrong[0]]
        raise DataError(f"{path}: MD5 {actual[wrong[0]]} does not match the published "
                        f"{_expected_md5(path, wrong[0], files)}, while the folder's other MNIST files match: "
                        "the file is corrupt. Delete it and download it again")
    is_mnist = not wrong
    arrays = {}
    for name, path in paths.items():
        try:
            arrays[name] = read_idx(path)
        except DataError as err:
            raise DataError(f"{err} (it is not MNIST either: its MD5 is not the published one)"
                            if not is_mnist else str(err)) from err
    x_train, x_test = arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]
    for images, name in ((x_train, "train-images-idx3-ubyte"), (x_test, "t10k-images-idx3-ubyte")):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{paths[name]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{folder}: training images are {x_train.shape[1:]}, test images {x_test.shape[1:]}")
    for images, name in ((x_train, "train-labels-idx1-ubyte"), (x_test, "t10k-labels-idx1-ubyte")):
        labels = arrays[name]
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
            raise DataError(f"{paths[name]}: expected labels 0, 1, 2, ... (N,), got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels in {name}")
    return Dataset(
        name="mnist" if is_mnist else "idx",
        source=f"MNIST from {folder}" if is_mnist else
        f"an IDX dataset in MNIST's layout from {folder} (not MNIST: no file has MNIST's MD5)",
        image_shape=tuple(x_train.shape[1:]),
        x_train=x_train.reshape(len(x_train), -1),
        y_train=arrays["train-labels-idx1-ubyte"].astype(np.int64),
        x_test=x_test.reshape(len(x_test), -1),
        y_test=arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
    )


def download_mnist(dest=CACHE, mirrors=MIRRORS, files=MNIST_FILES, timeout=30.0) -> Path:
    """Download the gzip files into ``dest``, MD5-checked; each is written atomically.

    Files already present with the right MD5 are kept. Raises DataError naming what failed and
    what to do when no mirror answers (no network, for example).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, (gz_md5, _) in files.items():
        target = dest / f"{name}.gz"
        if target.is_file() and md5(target) == gz_md5:
            continue
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{name}.gz"
            tmp = target.with_suffix(".gz.part")
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    tmp.write_bytes(response.read())
            except (urllib.error.URLError, OSError) as err:
                errors.append(f"{url}: {err}")
                continue
            if md5(tmp) != gz_md5:
                tmp.unlink()
                errors.append(f"{url}: MD5 mismatch")
                continue
            os.replace(tmp, target)
            break
        else:
            raise DataError(
                f"could not download {name}.gz from any mirror (no network?):\n  " + "\n  ".join(errors)
                + "\nPut the four MNIST files in a folder and pass --data-dir DIR or set BNLAB_DATA=DIR."
            )
    return dest


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images) as a small stand-in for MNIST.

    Pixel values 0..16 are scaled to 0..255; a fixed shuffle (``seed``) holds out ``test_fraction``.
    """
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = np.clip(digits.data * 16, 0, 255).astype(np.uint8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", "scikit-learn's bundled 8x8 digits (MNIST not found)", (8, 8),
                   x[train], y[train], x[test], y[test])


def load_dataset(data_dir=None, download: bool = False) -> Dataset:
    """MNIST if it is found (or downloaded when ``download``), else the embedded digits.

    An explicit ``data_dir`` that does not hold MNIST is an error, not a silent fallback, and so is a
    ``$BNLAB_DATA`` where no MNIST is found.
    """
    folder = find_mnist(data_dir)
    if folder is None and download:
        folder = download_mnist()
    if folder is not None:
        return load_mnist(folder)
    if data_dir is not None:
        missing = [n for n in MNIST_FILES if _file_in(Path(data_dir), n) is None]
        raise DataError(f"{data_dir}: no dataset in MNIST's layout there (missing {', '.join(missing)}[.gz])")
    if os.environ.get("BNLAB_DATA"):  # set on purpose: as explicit as --data-dir, so no silent digits either
        raise DataError(f"BNLAB_DATA={os.environ['BNLAB_DATA']}: no MNIST there, nor in its mnist/ subfolder (nor in "
                        f"the cache {CACHE}); point it at the four MNIST files, or unset it for the bundled digits")
    return load_digits()
