"""Tests for lowbit.experiments.data (offline datasets, IDX parsing, batching, augmentation)."""

import gzip
import platform
import struct

import numpy as np
import pytest
import torch

from lowbit.experiments import data as D


def _write_idx(path, array: np.ndarray, type_byte: int = 0x08, compress: bool = True) -> None:
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_normalisation_and_determinism():
    a = D.load_digits_tensors(val_fraction=0.2, seed=0)
    assert a.x_train.shape == (1438, 1, 8, 8) and a.x_eval.shape == (359, 1, 8, 8)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert len(a.y_train) == 1438 and len(a.y_eval) == 359
    assert abs(a.x_train.mean().item()) < 1e-5 and abs(a.x_train.std().item() - 1) < 1e-5
    b = D.load_digits_tensors(val_fraction=0.2, seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = D.load_digits_tensors(val_fraction=0.2, seed=1)
    assert not torch.equal(a.y_eval, c.y_eval)
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_digits_tensors(val_fraction=1.5)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    path = tmp_path / ("x.gz" if compress else "x")
    _write_idx(path, images, compress=compress)
    out = D.read_idx(path)
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    _write_idx(tmp_path / "i.gz", ints, type_byte=0x0C)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "i.gz"), ints)


def test_read_idx_corrupt_files(tmp_path):
    bad_magic = tmp_path / "bad_magic.gz"
    with gzip.open(bad_magic, "wb") as fh:
        fh.write(b"\x12\x34\x08\x01" + struct.pack(">I", 2) + b"\x00\x01")
    with pytest.raises(D.IdxFormatError, match="magic"):
        D.read_idx(bad_magic)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00\x01")
    with pytest.raises(D.IdxFormatError, match="payload"):
        D.read_idx(short)
    truncated_gzip = tmp_path / "trunc.gz"
    _write_idx(truncated_gzip, np.random.default_rng(0).integers(0, 255, (50, 50), dtype=np.uint8))
    truncated_gzip.write_bytes(truncated_gzip.read_bytes()[:100])
    with pytest.raises(D.IdxFormatError, match="trunc.gz"):
        D.read_idx(truncated_gzip)


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_not_found_message(tmp_path):
    with pytest.raises(D.DataNotFoundError) as info:
        D.find_fashion_mnist(tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in msg and str(tmp_path / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg


def test_fashion_mnist_search_order(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "nodebian")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    with pytest.raises(D.DataNotFoundError) as info:
        D.find_fashion_mnist()
    msg = str(info.value)
    assert msg.index("nodebian") < msg.index("data")


def test_a_set_lowbit_data_is_the_only_place_searched(tmp_path, monkeypatch):
    """$LOWBIT_DATA pointing at a missing or incomplete folder was skipped without a word:
    training went on with the Debian copy (or ./data) and exited 0. Now it is searched
    alone, like root=, and the error names it."""
    debian = tmp_path / "debian"
    rng = np.random.default_rng(0)
    debian.mkdir()
    for split, n in (("train", 4), ("t10k", 2)):
        _write_idx(debian / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        _write_idx(debian / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN_DIR", debian)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert D.find_fashion_mnist()["train_images"].parent == debian
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "typo"))
    with pytest.raises(D.DataNotFoundError, match=r"\$LOWBIT_DATA='.*typo' is set, so no other place was searched"):
        D.find_fashion_mnist()
    monkeypatch.setenv("LOWBIT_DATA", str(debian))
    assert D.find_fashion_mnist()["train_images"].parent == debian


def test_fashion_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        _write_idx(
            raw / f"{split}-images-idx3-ubyte",
            rng.integers(0, 256, (n, 28, 28)).astype(np.uint8),
            compress=False,
        )
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    files = D.find_fashion_mnist(tmp_path)
    assert files["train_images"] == raw / "train-images-idx3-ubyte"
    data = D.load_fashion_mnist(tmp_path, subset=8, seed=3)
    assert data.x_train.shape == (8, 1, 28, 28) and data.x_eval.shape == (6, 1, 28, 28)
    assert data.y_train.dtype == torch.int64 and data.x_train.dtype == torch.float32
    again = D.load_fashion_mnist(tmp_path, subset=8, seed=3)
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_train, again.y_train)
    with pytest.raises(ValueError, match="subset"):
        D.load_fashion_mnist(tmp_path, subset=0)
    with pytest.raises(ValueError, match="subset"):
        D.load_fashion_mnist(tmp_path, subset=21)


def test_fashion_mnist_labels_and_dtypes_are_checked_before_any_step(tmp_path):
    """A label of 200 loaded and failed the step whose batch held it, naming no file (a
    review): labels outside 0..9 and non-uint8 arrays are IdxFormatError naming the file."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    assert D.load_fashion_mnist(tmp_path).y_train.max() < 10
    labels = rng.integers(0, 10, 20).astype(np.uint8)
    labels[5] = 200
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(D.IdxFormatError, match=r"train-labels-idx1-ubyte.gz: label 200 at index 5"):
        D.load_fashion_mnist(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels.astype(np.int32), type_byte=0x0C)
    with pytest.raises(D.IdxFormatError, match=r"train-labels-idx1-ubyte.gz: holds int32"):
        D.load_fashion_mnist(tmp_path)


def test_a_text_subset_beyond_the_corpus_is_refused():
    """``--subset`` past the corpus trained on the whole corpus and recorded the number
    given (a review); the image tasks refused theirs."""
    whole, _ = D.load_text_corpus()
    with pytest.raises(ValueError, match=rf"subset must be at most {len(whole)}"):
        D.load_text_corpus(max_bytes=len(whole) + 1)
    assert D.load_text_corpus(max_bytes=len(whole))[0].shape == whole.shape


@pytest.mark.skipif(
    D._fashion_files(D.FASHION_MNIST_DEBIAN_DIR) is None,
    reason="dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_debian_files():
    data = D.load_fashion_mnist(D.FASHION_MNIST_DEBIAN_DIR, subset=2000, seed=0)
    assert data.x_train.shape == (2000, 1, 28, 28) and data.x_eval.shape == (10000, 1, 28, 28)
    assert set(data.y_eval.tolist()) == set(range(10))
    assert torch.bincount(data.y_eval).tolist() == [1000] * 10
    assert abs(data.x_eval.mean().item()) < 0.05 and abs(data.x_eval.std().item() - 1) < 0.05


# --------------------------------------------------------------------------- augmentation / batches


def test_random_crop_flip_shape_determinism_and_content():
    x = torch.randn(16, 3, 10, 12)
    a = D.random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    b = D.random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert not torch.equal(a, x)
    # padding 0: each image is either unchanged or mirrored
    c = D.random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    same = (c == x).flatten(1).all(1)
    mirrored = (c == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()
    # no flip, padding 1: the interior of each crop is a shifted copy of the image
    d = D.random_crop_flip(x, 1, torch.Generator().manual_seed(2), flip=False)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(len(x)):
        assert any(
            torch.equal(d[i], padded[i, :, dy : dy + 10, dx : dx + 12])
            for dy in range(3)
            for dx in range(3)
        )
    with pytest.raises(ValueError, match="padding"):
        D.random_crop_flip(x, -1, None)


def test_iterate_batches():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = list(D.iterate_batches(x, y, 4, shuffle=False, generator=None))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    g = torch.Generator().manual_seed(0)
    shuffled = list(D.iterate_batches(x, y, 4, shuffle=True, generator=g, drop_last=True))
    assert [len(b[1]) for b in shuffled] == [4, 4]
    for bx, by in shuffled:
        assert torch.equal(bx[:, 0].long(), by)
    seen = torch.cat([b[1] for b in shuffled])
    assert len(set(seen.tolist())) == 8 and not torch.equal(seen, y[:8])
    with pytest.raises(ValueError, match="batch_size"):
        list(D.iterate_batches(x, y, 0, shuffle=False, generator=None))
    with pytest.raises(ValueError, match="same length"):
        list(D.iterate_batches(x, y[:5], 2, shuffle=False, generator=None))


# --------------------------------------------------------------------------- text


def test_text_corpus_and_batches():
    data, source = D.load_text_corpus(max_bytes=20_000)
    assert data.dtype == torch.uint8 and data.shape == (20_000,) and source
    again, _ = D.load_text_corpus(max_bytes=20_000)
    assert torch.equal(data, again)
    train, val = D.split_text(data, val_fraction=0.05)
    assert len(val) == 1000 and torch.equal(torch.cat([train, val]), data)
    x, y = D.text_batches(
        train, block_size=32, batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # every window is a contiguous slice of the data, and y is the next byte
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(len(train) - 32) if torch.equal(train[s : s + 32].long(), row_x)]
        assert any(torch.equal(train[s + 1 : s + 33].long(), row_y) for s in starts)
    x2, _ = D.text_batches(train, 32, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        D.text_batches(train[:10], 10, 2, None)
    with pytest.raises(ValueError, match="batch_size"):
        D.text_batches(train, 4, 0, None)
    with pytest.raises(ValueError, match="max_bytes"):
        D.load_text_corpus(max_bytes=0)


def test_text_corpus_stdlib_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "PYTHON_DOC_SOURCES", tmp_path / "missing")
    data, source = D.load_text_corpus(max_bytes=5000)
    assert source.startswith(f"python{platform.python_version()}-stdlib:") and data.shape == (5000,)


def test_digits_without_scikit_learn_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    """Without scikit-learn (a plain ``pip install lowbit``) the default digits task ended
    the CLI in a traceback: the loader raised ImportError, which the CLI does not report
    as a one-line error. It is a missing dataset now (``DataNotFoundError``)."""
    import sys

    from lowbit import cli

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(D.DataNotFoundError, match=r"pip install scikit-learn \(or lowbit\[data\]\)"):
        D.load_digits_tensors()
    assert cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "r")]) == 2
    assert "lowbit train: error: the digits dataset needs scikit-learn" in capsys.readouterr().err
