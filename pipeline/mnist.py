"""MNIST in memory: every source (Keras ``.npz``, gzipped IDX, the PyPI pickle, a local file) becomes one
``MnistArrays``, checked against the md5s of the official *uncompressed* IDX files. No network here."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy._core.multiarray import _reconstruct  # NumPy 2's name; old pickles still say numpy.core

from pipeline.params import CONTENT_KEYS, IDX_GZ_FILES

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """Bytes or arrays are not valid MNIST (corrupt, truncated, wrong shape or checksum)."""


def to_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array (as MnistArrays holds) as IDX: ``00 00 08 <ndim>``, big-endian uint32 dims, the bytes."""
    header = bytes((0, 0, 0x08, array.ndim)) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def from_idx(data: bytes) -> np.ndarray:
    """Decode IDX bytes of type 0x08 (unsigned byte, MNIST's only type); truncated or trailing data is an error."""
    if len(data) < 4 or data[:3] != b"\0\0\x08" or data[3] == 0:
        raise DataError(f"not uint8 IDX data: header {data[:4].hex()}, expected 000008 and a dimension count >= 1")
    ndim, header = data[3], 4 + 4 * data[3]
    if len(data) < header:
        raise DataError(f"IDX header truncated: {ndim} dimensions need {header} bytes, got {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) != (expected := header + int(np.prod(shape, dtype=np.int64))):
        raise DataError(f"IDX data of shape {shape} must be {expected} bytes (truncated or trailing); got {len(data)}")
    # Copy so the array is writable and does not pin the (possibly large) input buffer.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


@dataclass(frozen=True, eq=False)
class MnistArrays:
    """The four MNIST arrays, validated: uint8 images (n, 28, 28) and uint8 labels 0..9 (n,), n > 0."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in (x, y)):
                raise DataError(f"{split}: expected dtype uint8, got {_describe(x)} and {_describe(y)}")
            if x.shape[1:] != IMAGE_SHAPE or y.shape != x.shape[:1] or not len(x):
                raise DataError(f"{split}: shapes {x.shape} and {y.shape}; expected (n, 28, 28) and (n,), n > 0")
            if int(y.max()) >= NUM_CLASSES:
                raise DataError(f"y_{split}: labels must be 0..{NUM_CLASSES - 1}; found {int(y.max())}")

    def as_npz(self) -> dict[str, np.ndarray]:
        """The arrays under the Keras ``mnist.npz`` keys."""
        return {key: getattr(self, key) for key in NPZ_KEYS}

    def by_content_key(self) -> dict[str, np.ndarray]:
        """The arrays under ``CONTENT_KEYS`` (the names of the official IDX files)."""
        return dict(zip(CONTENT_KEYS, self.as_npz().values(), strict=True))


def content_md5(arrays: MnistArrays) -> dict[str, str]:
    """md5 of each array written as uncompressed IDX (equal to the official files' md5s)."""
    return {
        key: hashlib.md5(to_idx(arr), usedforsecurity=False).hexdigest() for key, arr in arrays.by_content_key().items()
    }


def verify_content(arrays: MnistArrays, expected: Mapping[str, str]) -> None:
    """Raise DataError naming every array whose IDX md5 differs from ``expected``."""
    bad = [
        f"{key}: expected md5 {expected.get(key)}, got {digest}"
        for key, digest in content_md5(arrays).items()
        if digest != str(expected.get(key, "")).lower()
    ]
    if bad:
        raise DataError("content does not match the official MNIST checksums: " + "; ".join(bad))


def npz_to_arrays(source: str | Path | bytes) -> MnistArrays:
    """Load a Keras-layout ``.npz`` (path or bytes) without ever unpickling."""
    try:
        npz = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError("not an .npz archive (looks like a single .npy array)")
        with npz:
            if sorted(npz.files) != sorted(NPZ_KEYS):
                raise DataError(f"npz must hold exactly the arrays {', '.join(NPZ_KEYS)}; found {', '.join(npz.files)}")
            return MnistArrays(**{k: npz[k] for k in NPZ_KEYS})
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # allow_pickle=False turns object arrays and pickles into a ValueError here.
        raise DataError(f"cannot read npz: {exc}") from exc


def write_npz(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` whose bytes depend only on the arrays (fixed zip timestamps and
    modes, whatever NumPy's version), so identical data keeps its DVC hash."""
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


def gunzip(data: bytes, name: str = "data") -> bytes:
    """Decompress gzip data, CRC checked; no size cap: fetch checks every file against a pinned checksum first."""
    try:
        return gzip.decompress(data)
    except EOFError as exc:
        raise DataError(f"{name}: gzip stream is truncated") from exc
    except (OSError, zlib.error) as exc:
        raise DataError(f"{name}: not valid gzip data ({exc})") from exc


def from_idx_gz(files: Mapping[str, bytes]) -> MnistArrays:
    """Convert the four classic gzipped IDX files (keyed by their standard names)."""
    if missing := sorted(set(IDX_GZ_FILES) - set(files)):
        raise DataError(f"missing IDX file(s): {', '.join(missing)}")
    decoded = {key: from_idx(gunzip(files[name], name=name)) for name, key in IDX_GZ_FILES.items()}
    return MnistArrays(*(decoded[key] for key in CONTENT_KEYS))


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only numpy arrays: a pickle can call any importable callable while
    loading, and the PyPI MNIST pickle needs only these globals."""

    _ALLOWED: dict[tuple[str, str], Any] = {  # noqa: RUF012 - read-only lookup table
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DataError(f"pickle references {module}.{name}, which is not allowed (only numpy arrays)")
        return self._ALLOWED[(module, name)]


def from_pickle_gz(data: bytes) -> MnistArrays:
    """Convert the gzipped ``((Xtr, ytr), (Xva, yva), (Xte, yte))`` pickle: float32 (n, 784) pixels,
    exact multiples of 1/256; train and validation together, in order, are the 60,000 training images."""
    raw = io.BytesIO(gunzip(data, name="pickle"))  # CRC checked before any opcode is read
    try:
        obj = RestrictedUnpickler(raw, encoding="latin1").load()  # Python-2 strings as latin1
    except DataError:
        raise
    except Exception as exc:  # untrusted bytes can fail in any way; every failure means "corrupt"
        raise DataError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc
    if raw.read(1):
        raise DataError("unexpected data after the pickle")
    pairs = obj if isinstance(obj, tuple | list) and len(obj) == 3 else ()
    if not pairs or not all(isinstance(pair, tuple | list) and len(pair) == 2 for pair in pairs):
        raise DataError(f"pickle must hold 3 (images, labels) pairs; got {_describe(obj)}")
    xs, ys = [], []
    for i, (x, y) in enumerate(pairs):
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape[1:] == (784,)):
            raise DataError(f"pickle part {i} images: expected float32 of shape (n, 784); got {_describe(x)}")
        if not (isinstance(y, np.ndarray) and y.dtype.kind in "iu" and y.shape == x.shape[:1]):
            raise DataError(f"pickle part {i} labels: expected {len(x)} integers; got {_describe(y)}")
        scaled = x * np.float32(256)  # exact in float32 (a power of two), so the check below is exact too
        if not (np.array_equal(scaled, np.rint(scaled)) and np.all((scaled >= 0) & (scaled <= 255))):
            raise DataError(f"pickle part {i} images: pixel values are not multiples of 1/256 in [0, 255/256]")
        xs.append(scaled.astype(np.uint8).reshape(-1, *IMAGE_SHAPE))
        ys.append(y.astype(np.uint8))  # out-of-range labels wrap; MnistArrays or verify_content rejects them
    return MnistArrays(np.concatenate(xs[:2]), np.concatenate(ys[:2]), xs[2], ys[2])


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"ndarray {obj.dtype} {obj.shape}"
    return f"{type(obj).__name__} of length {len(obj)}" if isinstance(obj, tuple | list) else type(obj).__name__
