"""IDX reading, MNIST loading with MD5 checks, the download path (on a loopback server), fallbacks."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlab import data as D
from bnlab.data import mnist as M


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = D.write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = D.read_idx(path)
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, array)


def test_idx_header_is_the_published_layout(tmp_path):
    path = D.write_idx(tmp_path / "x.idx", np.zeros((2, 3), np.uint8))
    assert path.read_bytes()[:12] == bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3])


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = D.write_idx(tmp_path / "good.idx", np.ones((4, 5), np.uint8)).read_bytes()
    (tmp_path / "short.idx").write_bytes(good[:-3])
    with pytest.raises(D.DataError, match="short.idx.*truncated"):
        D.read_idx(tmp_path / "short.idx")
    (tmp_path / "long.idx").write_bytes(good + b"xx")
    with pytest.raises(D.DataError, match="long.idx.*longer"):
        D.read_idx(tmp_path / "long.idx")
    (tmp_path / "magic.idx").write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(D.DataError, match="magic.idx.*magic"):
        D.read_idx(tmp_path / "magic.idx")
    (tmp_path / "cut.idx.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(D.DataError, match="cut.idx.gz.*gzip"):
        D.read_idx(tmp_path / "cut.idx.gz")
    # sizes whose product is 2^64, 0 in int64: a header alone passed the size check, then failed in
    # NumPy's reshape without the file's name (until 2026-11-24)
    (tmp_path / "wrap.idx").write_bytes(bytes([0, 0, 0x08, 3]) + np.array([2**31, 2**31, 4], ">u4").tobytes())
    with pytest.raises(D.DataError, match="wrap.idx.*truncated"):
        D.read_idx(tmp_path / "wrap.idx")
    # no values (a size of 0) beside sizes no array can have: NumPy's error, unnamed, until 2026-11-24
    (tmp_path / "huge.idx").write_bytes(bytes([0, 0, 0x0E, 3]) + np.array([0, 2**32 - 1, 2**32 - 1], ">u4").tobytes())
    with pytest.raises(D.DataError, match="huge.idx.*make no array"):
        D.read_idx(tmp_path / "huge.idx")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_file_is_read_whole_or_refused_by_name(tmp_path, data):
    """Bytes changed, the file cut, its dimension count changed, random bytes, gzip cut: the
    reader returns an array of the header's shape or raises its own error naming the file."""
    array = data.draw(st.sampled_from([np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
                                       np.linspace(0, 1, 12).reshape(3, 4)]))
    raw = bytearray(D.write_idx(tmp_path / "good.idx", array).read_bytes())
    damage = data.draw(st.sampled_from(["bytes", "cut", "ndim", "random"]))
    if damage == "bytes":
        for at, value in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                                            min_size=1, max_size=4)):
            raw[at] = value
    elif damage == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif damage == "ndim":
        raw[3] = data.draw(st.integers(0, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=40)))
    payload = bytes(raw)
    if data.draw(st.booleans()):
        payload = gzip.compress(payload)
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    path = tmp_path / "damaged.idx"
    path.write_bytes(payload)
    try:
        values = D.read_idx(path)
    except D.DataError as err:
        assert "damaged.idx" in str(err)
    else:
        read = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload  # (what the reader read)
        assert values.shape == tuple(int(n) for n in np.frombuffer(read, ">u4", count=read[3], offset=4))


def tiny_mnist(folder: Path, gz: bool = True) -> dict:
    """Four small IDX files with MNIST's names; returns their MD5 table."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(12) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(5) % 10).astype(np.uint8),
    }
    table = {}
    for name, array in arrays.items():
        raw = D.write_idx(folder / "raw.tmp", array, compress=False).read_bytes()
        (folder / "raw.tmp").unlink()
        packed = gzip.compress(raw, mtime=0)
        (folder / (f"{name}.gz" if gz else name)).write_bytes(packed if gz else raw)
        table[name] = (hashlib.md5(packed).hexdigest(), hashlib.md5(raw).hexdigest())
    return table


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_checks_md5_and_shapes(tmp_path, gz):
    table = tiny_mnist(tmp_path, gz)
    ds = D.load_mnist(tmp_path, files=table)
    assert ds.x_train.shape == (12, 16) and ds.x_test.shape == (5, 16) and ds.image_shape == (4, 4)
    assert ds.y_train.tolist() == [i % 10 for i in range(12)] and ds.num_classes == 10
    # Against the real MNIST checksums no file matches: another dataset in MNIST's layout, said so
    other = D.load_mnist(tmp_path)
    assert other.name == "idx" and "not MNIST" in other.source
    assert np.array_equal(other.x_train, ds.x_train) and np.array_equal(other.y_test, ds.y_test)


def test_a_damaged_mnist_copy_is_refused_naming_the_file(tmp_path):
    """Some files with MNIST's MD5 and one without is a corrupt copy, not another dataset."""
    table = tiny_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    D.write_idx(labels, np.arange(5, dtype=np.uint8)[::-1])  # (valid IDX, other labels)
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz: MD5 .* other MNIST files match.*corrupt"):
        D.load_mnist(tmp_path, files=table)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>not found</html>"),
     "not an IDX file.*not MNIST either"),
    (lambda f: D.write_idx(f / "t10k-labels-idx1-ubyte.gz", np.arange(4, dtype=np.uint8)),
     "5 images but 4 labels"),
    (lambda f: D.write_idx(f / "t10k-images-idx3-ubyte.gz", np.zeros((5, 3, 3), np.uint8)),
     r"training images are \(4, 4\), test images \(3, 3\)"),
    (lambda f: D.write_idx(f / "train-images-idx3-ubyte.gz", np.zeros((12, 16), np.float32)),
     "expected uint8 images"),
])
def test_another_idx_dataset_has_its_structure_checked(tmp_path, damage, message):
    tiny_mnist(tmp_path)
    damage(tmp_path)
    with pytest.raises(D.DataError, match=message):
        D.load_mnist(tmp_path)


class _Server:
    """A loopback HTTP server over a folder; bounded, stopped by the test."""

    def __init__(self, folder: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_falls_back_across_mirrors_and_checks_md5(tmp_path):
    table = tiny_mnist(tmp_path / "served")
    (tmp_path / "wrong").mkdir()
    for name in table:  # a mirror serving corrupt files
        (tmp_path / "wrong" / f"{name}.gz").write_bytes(b"not mnist")
    with _Server(tmp_path / "served") as good, _Server(tmp_path / "wrong") as bad:
        dest = D.download_mnist(tmp_path / "cache", mirrors=(bad.url, good.url), files=table, timeout=5)
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in table)  # no .part left
    assert D.load_mnist(dest, files=table).x_train.shape == (12, 16)


def test_download_without_network_says_what_to_do(tmp_path):
    table = tiny_mnist(tmp_path / "served")
    with pytest.raises(D.DataError, match="(?s)could not download.*--data-dir"):
        D.download_mnist(tmp_path / "cache", mirrors=("http://127.0.0.1:9/",), files=table, timeout=2)
    assert not any((tmp_path / "cache").iterdir())


def test_search_order_and_embedded_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "CACHE", tmp_path / "no-cache")
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    assert D.find_mnist() is None
    ds = D.load_dataset()
    assert ds.name == "digits" and "scikit-learn" in ds.source
    assert ds.x_train.shape[1] == 64 and ds.x_train.max() == 255 and len(ds.x_train) + len(ds.x_test) == 1797
    tiny_mnist(tmp_path / "env" / "mnist")
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "env"))
    assert D.find_mnist() == tmp_path / "env" / "mnist"
    assert D.find_mnist(tmp_path / "env" / "mnist") == tmp_path / "env" / "mnist"
    with pytest.raises(D.DataError, match="no dataset in MNIST's layout there"):
        D.load_dataset(tmp_path / "empty")
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "elsewhere"))  # set, but no MNIST: not the digits silently
    with pytest.raises(D.DataError, match="BNLAB_DATA=.*elsewhere: no MNIST there, nor in its mnist/ subfolder"):
        D.load_dataset()


def test_real_mnist_when_present(mnist_dir):
    ds = D.load_mnist(mnist_dir)
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert np.bincount(ds.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
