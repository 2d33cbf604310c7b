"""MNIST in memory: validated arrays, the IDX format, content checksums and safe loaders.

Nothing here touches the network. Every source (the Keras ``.npz``, the gzipped IDX files,
the Python-2 pickle in a PyPI wheel, a local file) becomes one ``MnistArrays``, checked
against the md5s of the official *uncompressed* IDX files, so no later stage depends on
which mirror answered. Pickles load only numpy globals; ``.npz`` files never unpickle.
"""

from __future__ import annotations

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
# Guards against decompression bombs: the real pickle inflates to 220 MB and the
# largest IDX file to 47 MB; anything far beyond that is not MNIST.
MAX_DECOMPRESSED_BYTES = 512 * 1024 * 1024

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST uses


class DataError(ValueError):
    """Bytes or arrays are not valid MNIST (corrupt, truncated, wrong shape or checksum)."""


# ----------------------------------------------------------------------------- IDX
def to_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: ``00 00 08 <ndim>``, each dim as big-endian uint32, the bytes."""
    # NumPy itself keeps ndim <= 64 (fits the header's byte) and refuses dims that overflow uint32.
    if array.dtype != np.uint8 or array.ndim == 0:
        raise DataError(f"IDX encodes uint8 arrays of 1 or more dimensions only; got {array.dtype} {array.shape}")
    header = bytes((0, 0, _IDX_UBYTE, array.ndim)) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def from_idx(data: bytes) -> np.ndarray:
    """Decode IDX bytes (uint8 only); truncated or trailing data is an error."""
    if len(data) < 4:
        raise DataError(f"IDX data too short for a header ({len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 or zero1:
        raise DataError(f"not IDX data: magic starts with {data[:2].hex()}, expected 0000")
    if type_code != _IDX_UBYTE:
        raise DataError(f"IDX type code 0x{type_code:02x} is not supported (MNIST uses 0x08, unsigned byte)")
    if ndim == 0:
        raise DataError("IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"IDX header truncated: {ndim} dimensions need {header_len} bytes, got {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_len + int(np.prod(shape, dtype=np.int64))
    if len(data) < expected:
        raise DataError(f"IDX data truncated: shape {shape} needs {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise DataError(f"IDX data has {len(data) - expected} trailing bytes after shape {shape}")
    # Copy so the array is writable and does not pin the (possibly large) input buffer.
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()


# -------------------------------------------------------------------------- arrays
@dataclass(frozen=True, eq=False)
class MnistArrays:
    """The four MNIST arrays, validated: uint8 images (n, 28, 28) and uint8 labels 0..9 (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            for name, arr in ((f"x_{split}", x), (f"y_{split}", y)):
                if not isinstance(arr, np.ndarray):
                    raise DataError(f"{name}: expected a numpy array, got {type(arr).__name__}")
                if arr.dtype != np.uint8:
                    raise DataError(f"{name}: expected dtype uint8, got {arr.dtype}")
            if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
                raise DataError(f"x_{split}: expected shape (n, 28, 28), got {x.shape}")
            if y.ndim != 1:
                raise DataError(f"y_{split}: expected shape (n,), got {y.shape}")
            if len(x) != len(y):
                raise DataError(f"{split}: {len(x)} images but {len(y)} labels")
            if len(x) == 0:
                raise DataError(f"{split}: no examples")
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


def content_digest(arrays: MnistArrays) -> str:
    """One sha256 over the four IDX encodings in ``CONTENT_KEYS`` order (a lineage tag).

    IDX headers carry their own sizes, so the concatenation is unambiguous.
    """
    return hashlib.sha256(b"".join(map(to_idx, arrays.by_content_key().values()))).hexdigest()


# ----------------------------------------------------------------------------- npz
def npz_to_arrays(source: str | Path | bytes) -> MnistArrays:
    """Load a Keras-layout ``.npz`` (path or bytes) without ever unpickling."""
    fileobj: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    try:
        npz = np.load(fileobj, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError("not an .npz archive (looks like a single .npy array)")
        with npz:
            keys = sorted(npz.files)
            if keys != sorted(NPZ_KEYS):
                raise DataError(f"npz must hold exactly the arrays {', '.join(NPZ_KEYS)}; found {', '.join(keys)}")
            loaded = {k: npz[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        # allow_pickle=False turns object arrays and pickles into a ValueError here.
        raise DataError(f"cannot read npz: {exc}") from exc
    return MnistArrays(**loaded)


def write_npz(file: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` whose bytes depend only on the arrays.

    Timestamps and file modes inside the zip are fixed here rather than left to the
    NumPy version at hand, so identical data keeps its DVC hash and does not
    needlessly invalidate downstream stages.
    """
    with zipfile.ZipFile(file, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)


# -------------------------------------------------------------------------- IDX gz
def gunzip(data: bytes, limit: int = MAX_DECOMPRESSED_BYTES, name: str = "data") -> bytes:
    """Decompress one gzip member, refusing truncated input, trailing bytes and bombs."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise DataError(f"{name}: not valid gzip data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise DataError(f"{name}: decompresses to more than {limit} bytes; not MNIST")
    if not inflater.eof:
        raise DataError(f"{name}: gzip stream is truncated")
    if inflater.unused_data:
        raise DataError(f"{name}: {len(inflater.unused_data)} unexpected bytes after the gzip stream")
    return out


def from_idx_gz(files: Mapping[str, bytes]) -> MnistArrays:
    """Convert the four classic gzipped IDX files (keyed by their standard names)."""
    missing = sorted(set(IDX_GZ_FILES) - set(files))
    if missing:
        raise DataError(f"missing IDX file(s): {', '.join(missing)}")
    decoded = {key: from_idx(gunzip(files[name], name=name)) for name, key in IDX_GZ_FILES.items()}
    return MnistArrays(*(decoded[key] for key in CONTENT_KEYS))


# -------------------------------------------------------------------------- pickle
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild plain numpy arrays.

    A pickle can call any importable callable while loading; the only globals the
    PyPI MNIST pickle needs are the three below, so everything else is refused.
    """

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

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("pickle uses persistent ids, which are not allowed")


def unpickle_restricted(data: BinaryIO) -> Any:
    """Unpickle (Python-2 strings as latin1) allowing only numpy array globals."""
    try:
        return RestrictedUnpickler(data, encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:  # untrusted bytes can fail in any way; every failure means "corrupt"
        raise DataError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc


def from_pickle_gz(data: bytes) -> MnistArrays:
    """Convert the gzipped ``((Xtr, ytr), (Xva, yva), (Xte, yte))`` pickle to MnistArrays.

    Pixels are float32 exact multiples of 1/256 in (n, 784); train and validation
    together, in order, are the original 60,000-image training set.
    """
    # gunzip caps the size and checks the CRC before a single opcode is read.
    raw = io.BytesIO(gunzip(data, name="pickle"))
    obj = unpickle_restricted(raw)
    if raw.read(1):
        raise DataError("unexpected data after the pickle")
    if not (isinstance(obj, tuple | list) and len(obj) == 3):
        raise DataError(f"pickle must hold 3 (images, labels) pairs; got {_describe(obj)}")
    parts = []
    for i, pair in enumerate(obj):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise DataError(f"pickle part {i} must be an (images, labels) pair; got {_describe(pair)}")
        x, y = _pixels_from_float(pair[0], f"part {i} images"), _labels_from_int(pair[1], f"part {i} labels")
        if len(x) != len(y):
            raise DataError(f"pickle part {i}: {len(x)} images but {len(y)} labels")
        parts.append((x, y))
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = parts
    return MnistArrays(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), x_te, y_te)


def _pixels_from_float(x: Any, where: str) -> np.ndarray:
    side = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != side:
        raise DataError(f"{where}: expected a float32 array of shape (n, {side}); got {_describe(x)}")
    # Multiplying by a power of two is exact in float32, so the check below is exact too.
    scaled = x * np.float32(256)
    if not np.array_equal(scaled, np.rint(scaled)) or scaled.min() < 0 or scaled.max() > 255:
        raise DataError(f"{where}: pixel values are not multiples of 1/256 in [0, 255/256]")
    return scaled.astype(np.uint8).reshape(-1, *IMAGE_SHAPE)


def _labels_from_int(y: Any, where: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{where}: expected a 1-D integer array; got {_describe(y)}")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{where}: labels must be 0..{NUM_CLASSES - 1}")
    return y.astype(np.uint8)


def _describe(obj: Any) -> str:
    if isinstance(obj, np.ndarray):
        return f"ndarray {obj.dtype} {obj.shape}"
    if isinstance(obj, tuple | list):
        return f"{type(obj).__name__} of length {len(obj)}"
    return type(obj).__name__


# -------------------------------------------------------------------------- hashes
def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest of a file, streamed (``algorithm``: sha256 or md5)."""
    # usedforsecurity=False keeps md5 available on FIPS builds of OpenSSL.
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()
