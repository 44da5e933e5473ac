"""Offline datasets, batch iterators and a CPU-friendly augmentation.

Nothing here downloads anything. The data come from places installed ahead of time:

* digits: ``sklearn.datasets.load_digits`` (bundled with scikit-learn);
* Fashion-MNIST: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``) or a torchvision-style folder;
* text: the reStructuredText sources of Debian's ``python3.11-doc``, or, failing that,
  the Python standard library's own ``.py`` files.
"""

import gzip
import os
import platform
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..noise import torch_seed

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = 10
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset is not installed in any of the places searched."""


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt or not an IDX file at all."""


class ImageData(NamedTuple):
    """Image tensors of a train/evaluation split.

    ``x_*`` are float32 ``(N, 1, H, W)``, ``y_*`` int64 ``(N,)``. The evaluation split is the
    validation split for digits and the official test split for Fashion-MNIST.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- digits


def load_digits_tensors(val_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Load scikit-learn's 8×8 digits (1797 images, values 0..16) as a seeded train/val split.

    Pixels are divided by 16, then standardised with the mean and standard deviation of the
    training pixels (scalars). Returns :class:`ImageData` with ``x`` shaped ``(N, 1, 8, 8)``
    float32 and int64 labels; the same ``seed`` always gives the same split.
    """
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as exc:  # scikit-learn is the optional "data" extra
        if exc.name is None or exc.name.split(".")[0] != "sklearn":
            raise  # scikit-learn is there, something it imports is not: its own error
        raise DataNotFoundError(  # a missing dataset: one line from the CLI, not a traceback
            "the digits dataset needs scikit-learn: pip install scikit-learn (or lowbit[data])"
        ) from exc

    _check_fraction("val_fraction", val_fraction)
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))  # (N,)
    n = len(y)
    n_val = max(1, round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(torch_seed(seed)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_train, x_val = x[train_idx], x[val_idx]
    mean, std = x_train.mean(), x_train.std()
    return ImageData((x_train - mean) / std, y[train_idx], (x_val - mean) / std, y[val_idx])


# --------------------------------------------------------------------------- IDX / Fashion-MNIST


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array.

    The header is two zero bytes, a type byte, a dimension count, then one big-endian uint32
    per dimension. Raises :class:`IdxFormatError` naming the file when the magic number, the
    type or the payload length is wrong, or the gzip stream is damaged.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise IdxFormatError(f"{path}: cannot read IDX data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: payload is {len(raw) - header} bytes, header shape {shape} needs {expected}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _fashion_files(directory: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``directory`` (raw or ``.gz``), or None if any is missing."""
    found = {}
    for key, stem in FASHION_MNIST_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Locate the Fashion-MNIST IDX files and return them keyed by ``FASHION_MNIST_FILES``.

    With an explicit ``root``, or ``$LOWBIT_DATA`` set, only that root is searched (a wrong
    path never silently falls back to another copy: a run would train on data the user did
    not point at). Otherwise the bases are the Debian path
    ``/usr/share/datasets/fashion-mnist`` and ``./data``. For every base the directory itself,
    ``BASE/FashionMNIST/raw`` (torchvision's layout) and ``BASE/fashion-mnist`` are tried, with
    either uncompressed ``*-ubyte`` or ``*-ubyte.gz`` files. Raises :class:`DataNotFoundError`
    listing every directory tried and the install command.
    """
    env = os.environ.get("LOWBIT_DATA")
    if root is not None:
        bases = [Path(root)]
    elif env:
        bases = [Path(env)]
    else:
        bases = [FASHION_MNIST_DEBIAN_DIR, Path("data")]
    tried: list[Path] = []
    for base in bases:
        for directory in (base, base / "FashionMNIST" / "raw", base / "fashion-mnist"):
            if directory in tried:
                continue
            tried.append(directory)
            files = _fashion_files(directory)
            if files is not None:
                return files
    names = ", ".join(f"{stem}[.gz]" for stem in FASHION_MNIST_FILES.values())
    raise DataNotFoundError(
        f"Fashion-MNIST not found: looked for {names} in "
        + ", ".join(str(d) for d in tried)
        + f". Install it with `{FASHION_MNIST_INSTALL}` (files go to {FASHION_MNIST_DEBIAN_DIR}),"
        " or point root= / $LOWBIT_DATA at a folder holding the IDX files"
        + (f" ($LOWBIT_DATA={env!r} is set, so no other place was searched)." if env and root is None else ".")
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None, subset: int | None = None, seed: int = 0
) -> ImageData:
    """Load Fashion-MNIST as normalised float32 ``(N, 1, 28, 28)`` tensors and int64 labels.

    Files are located with :func:`find_fashion_mnist`. Pixels become
    ``(x / 255 - 0.2860) / 0.3530``. ``subset`` keeps a fixed random sample (chosen by
    ``seed``) of that many training images for short runs; the test split is always whole.
    Returns :class:`ImageData` with ``x_eval``/``y_eval`` the 10 000 test images.
    """
    if subset is not None:
        _check_positive_int("subset", subset)
    files = find_fashion_mnist(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise IdxFormatError(
                f"{files[f'{split}_images']}: unexpected shapes {images.shape} / {labels.shape}"
            )
        # what the files must hold, checked before any step (a label of 200 failed the
        # step whose batch held it, naming no file: a review)
        for key, arr in ((f"{split}_images", images), (f"{split}_labels", labels)):
            if arr.dtype != np.uint8:
                raise IdxFormatError(f"{files[key]}: holds {arr.dtype.name}, Fashion-MNIST's IDX files hold uint8")
        if labels.size and int(labels.max()) >= FASHION_MNIST_CLASSES:
            bad = int(np.argmax(labels >= FASHION_MNIST_CLASSES))
            raise IdxFormatError(f"{files[f'{split}_labels']}: label {int(labels[bad])} at index {bad}; "
                                 f"Fashion-MNIST's labels are 0..{FASHION_MNIST_CLASSES - 1}")
    x_train, y_train = arrays["train_images"], arrays["train_labels"]
    if subset is not None:
        if subset > len(y_train):
            raise ValueError(f"subset must be at most {len(y_train)}, got {subset}")
        idx = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(torch_seed(seed)))[:subset]
        x_train, y_train = x_train[idx.numpy()], y_train[idx.numpy()]

    def to_x(a: np.ndarray) -> torch.Tensor:
        x = (
            torch.from_numpy(np.ascontiguousarray(a)).float().div_(255.0).unsqueeze(1)
        )  # (N,1,28,28)
        return x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)

    def to_y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))  # (N,)

    return ImageData(
        to_x(x_train), to_y(y_train), to_x(arrays["test_images"]), to_y(arrays["test_labels"])
    )


# --------------------------------------------------------------------------- image batches


def random_crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator | None, flip: bool = True
) -> torch.Tensor:
    """Random crop after zero padding, plus a random horizontal flip, for a batch ``(N, C, H, W)``.

    Each image gets its own offset in ``[0, 2 * padding]`` per axis and, when ``flip`` is set,
    is mirrored with probability 1/2. Vectorised as a single gather; the random numbers come
    from ``generator`` (drawn on its device, then moved to ``x.device``), so a seeded generator
    gives the same result every time. Returns a new tensor of the same shape and dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a batch shaped (N, C, H, W), got shape {tuple(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, c, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=gen_device)
    flips = torch.rand(n, generator=generator, device=gen_device) < 0.5
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))  # (N, C, H+2p, W+2p)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)  # (N, W)
    if flip:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    cols = offsets[1, :, None] + cols  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]  # (N, C, H, W)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_batch, y_batch)`` slices of paired tensors, optionally in a shuffled order.

    The permutation is drawn from ``generator`` (on the CPU) when ``shuffle`` is set. The last,
    smaller batch is skipped when ``drop_last`` is set.
    """
    _check_positive_int("batch_size", batch_size)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size].to(x.device)
            yield x[idx], y[idx.to(y.device)]


# --------------------------------------------------------------------------- text


def _stdlib_sources() -> tuple[Path, list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts)]
    return stdlib, sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def load_text_corpus(max_bytes: int | None = None) -> tuple[torch.Tensor, str]:
    """Read a byte-level text corpus from local files; returns ``(bytes_uint8, source_name)``.

    Uses the ``**/*.rst.txt`` sources of Debian's ``python3.11-doc``
    (``/usr/share/doc/python3.11/html/_sources``), sorted by relative path and concatenated.
    If that package is absent it falls back to the standard library's ``.py`` files
    (``sysconfig.get_paths()["stdlib"]``, without site-packages), also sorted. ``max_bytes``
    truncates the corpus (reading stops as soon as enough bytes are in); ``ValueError``
    where the corpus is shorter (a larger ``--subset`` was run on the whole corpus and
    recorded as given: a review; the image tasks refuse theirs too).
    """
    if max_bytes is not None:
        _check_positive_int("max_bytes", max_bytes)
    docs = sorted(
        PYTHON_DOC_SOURCES.rglob("*.rst.txt"),
        key=lambda p: p.relative_to(PYTHON_DOC_SOURCES).as_posix(),
    )
    if docs:
        files, source = docs, f"python3.11-doc:{PYTHON_DOC_SOURCES}"
    else:
        stdlib, files = _stdlib_sources()
        source = f"python{platform.python_version()}-stdlib:{stdlib}"  # the version: another
        # Python's standard library is another corpus
    if not files:
        raise DataNotFoundError(
            f"no text corpus: {PYTHON_DOC_SOURCES} and the stdlib sources are both empty; "
            "install it with `apt-get install python3.11-doc`"
        )
    chunks, total = [], 0
    for path in files:
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    data = b"".join(chunks)[:max_bytes]
    if max_bytes is not None and len(data) < max_bytes:
        raise ValueError(f"subset must be at most {len(data)} (the text corpus {source} has "
                         f"{len(data)} bytes), got {max_bytes}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), source


def split_text(data: torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 1-D byte tensor into ``(train, val)``: the last ``val_fraction`` is validation."""
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    _check_fraction("val_fraction", val_fraction)
    n_val = int(len(data) * val_fraction)
    if n_val < 1 or n_val >= len(data):
        raise ValueError(f"val_fraction={val_fraction} leaves an empty split of {len(data)} bytes")
    return data[:-n_val], data[-n_val:]


def text_batches(
    data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows of ``block_size`` tokens from a 1-D tensor.

    Returns int64 ``(x, y)`` shaped ``(B, T)`` on ``data.device`` with ``y[:, t] == x[:, t + 1]``,
    i.e. ``y`` is ``x`` shifted one token to the left (next-token targets).
    """
    _check_positive_int("block_size", block_size)
    _check_positive_int("batch_size", batch_size)
    if data.dim() != 1:
        raise ValueError(f"data must be 1-D, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(
            f"block_size={block_size} needs more than {block_size} tokens, got {len(data)}"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    starts = torch.randint(
        0, len(data) - block_size, (batch_size,), generator=generator, device=gen_device
    )
    idx = starts.to(data.device)[:, None] + torch.arange(block_size, device=data.device)  # (B, T)
    return data[idx].long(), data[idx + 1].long()  # (B, T), (B, T)
