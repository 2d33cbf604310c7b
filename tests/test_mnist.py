"""Pure MNIST handling: IDX, validation, checksums, npz and the restricted unpickler."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from pipeline import mnist
from pipeline.mnist import DataError, MnistArrays
from tests.helpers_data import Py2StylePickler, idx_gz_files, npz_bytes, pickle_gz, synthetic_arrays

HEADER_3D = bytes.fromhex("00000803000000020000001c0000001c")  # 2 images of 28x28
HEADER_1D = bytes.fromhex("0000080100000003")  # 3 labels


# ---------------------------------------------------------------------------- IDX
def test_idx_header_matches_hand_written_bytes() -> None:
    images = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    assert mnist.to_idx(images) == HEADER_3D + images.tobytes()
    assert mnist.to_idx(labels) == HEADER_1D + b"\x07\x00\x09"


def test_idx_round_trip() -> None:
    arr = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    back = mnist.from_idx(mnist.to_idx(arr))
    assert back.dtype == np.uint8 and back.shape == (5, 28, 28)
    np.testing.assert_array_equal(back, arr)
    back[0, 0, 0] ^= 1  # decoded arrays are writable copies


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (HEADER_1D + b"\x07\x00", r"shape \(3,\) must be 11 bytes \(truncated or trailing\); got 10"),
        (HEADER_1D + b"\x07\x00\x09\x01", r"shape \(3,\) must be 11 bytes \(truncated or trailing\); got 12"),
        (HEADER_3D[:10], "header truncated: 3 dimensions need 16 bytes, got 10"),
        (b"\x00\x00", "not uint8 IDX data: header 0000,"),
        (b"\x1f\x8b\x08\x01" + bytes(8), "not uint8 IDX data: header 1f8b0801,"),  # a gzip file
        (bytes.fromhex("00000d01 00000001") + bytes(4), "not uint8 IDX data: header 00000d01,"),
        (bytes.fromhex("00000800"), "not uint8 IDX data: header 00000800,"),
    ],
)
def test_from_idx_rejects_bad_data(data: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        mnist.from_idx(data)


# ------------------------------------------------------------------------- arrays
def test_mnist_arrays_validation() -> None:
    good = synthetic_arrays(4, 2)
    with pytest.raises(DataError, match="dtype uint8"):
        MnistArrays(good.x_train.astype(np.float32), good.y_train, good.x_test, good.y_test)
    with pytest.raises(DataError, match=r"shapes \(4, 784\) and \(4,\); expected \(n, 28, 28\)"):
        MnistArrays(good.x_train.reshape(4, 784), good.y_train, good.x_test, good.y_test)
    with pytest.raises(DataError, match=r"shapes \(4, 28, 28\) and \(3,\); expected"):
        MnistArrays(good.x_train, good.y_train[:3], good.x_test, good.y_test)
    with pytest.raises(DataError, match=r"labels must be 0\.\.9"):
        MnistArrays(good.x_train, np.full(4, 10, np.uint8), good.x_test, good.y_test)


def test_content_md5_of_tiny_dataset() -> None:
    arrays = MnistArrays(
        x_train=np.zeros((1, 28, 28), np.uint8),
        y_train=np.array([3], np.uint8),
        x_test=np.full((1, 28, 28), 255, np.uint8),
        y_test=np.array([9], np.uint8),
    )
    header_1 = bytes.fromhex("00000803 00000001 0000001c 0000001c")
    expected = {
        "train_images": hashlib.md5(header_1 + bytes(784)).hexdigest(),
        "train_labels": hashlib.md5(bytes.fromhex("00000801 00000001 03")).hexdigest(),
        "test_images": hashlib.md5(header_1 + b"\xff" * 784).hexdigest(),
        "test_labels": hashlib.md5(bytes.fromhex("00000801 00000001 09")).hexdigest(),
    }
    assert mnist.content_md5(arrays) == expected
    mnist.verify_content(arrays, expected)


def test_verify_content_names_mismatches() -> None:
    arrays = synthetic_arrays()
    expected = mnist.content_md5(arrays)
    mnist.verify_content(arrays, {k: v.upper() for k, v in expected.items()})  # hex case does not matter
    bad = dict(expected, test_labels="0" * 32)
    with pytest.raises(DataError) as info:
        mnist.verify_content(arrays, bad)
    message = str(info.value)
    assert "test_labels" in message and "0" * 32 in message and expected["test_labels"] in message
    assert "train_images" not in message


# ---------------------------------------------------------------------------- npz
def test_npz_round_trip_is_deterministic(tmp_path) -> None:
    arrays = synthetic_arrays()
    data = npz_bytes(arrays)
    assert data == npz_bytes(synthetic_arrays())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # nothing in the archive depends on when it was written
        members = zf.infolist()
    assert [m.filename for m in members] == ["x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy"]
    assert {(m.date_time, m.compress_type, m.external_attr) for m in members} == {
        ((1980, 1, 1, 0, 0, 0), zipfile.ZIP_STORED, 0o644 << 16)
    }
    path = tmp_path / "m.npz"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        back = mnist.npz_to_arrays(source)
        assert mnist.content_md5(back) == mnist.content_md5(arrays)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_npz_refuses_pickled_object_arrays() -> None:
    good = synthetic_arrays().as_npz()
    data = _npz(**dict(good, y_test=np.array([{"a": 1}], dtype=object)))
    with pytest.raises(DataError, match="pickle"):
        mnist.npz_to_arrays(data)


def test_npz_refuses_wrong_keys_and_dtypes() -> None:
    good = synthetic_arrays().as_npz()
    missing = {k: v for k, v in good.items() if k != "y_test"}
    with pytest.raises(DataError, match="exactly the arrays"):
        mnist.npz_to_arrays(_npz(**missing))
    with pytest.raises(DataError, match="exactly the arrays"):
        mnist.npz_to_arrays(_npz(**good, extra=np.zeros(1)))
    with pytest.raises(DataError, match="uint8"):
        mnist.npz_to_arrays(_npz(**dict(good, x_train=good["x_train"].astype(np.float32))))


def test_npz_refuses_garbage_and_plain_npy() -> None:
    with pytest.raises(DataError):
        mnist.npz_to_arrays(b"not a zip file at all")
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    with pytest.raises(DataError, match=r"not an \.npz"):
        mnist.npz_to_arrays(buf.getvalue())


# ------------------------------------------------------------------------- IDX gz
def test_from_idx_gz_round_trip() -> None:
    arrays = synthetic_arrays()
    back = mnist.from_idx_gz(idx_gz_files(arrays))
    assert mnist.content_md5(back) == mnist.content_md5(arrays)


def test_from_idx_gz_rejects_missing_and_corrupt_files() -> None:
    files = idx_gz_files(synthetic_arrays())
    with pytest.raises(DataError, match="missing IDX file"):
        mnist.from_idx_gz({k: v for k, v in files.items() if not k.startswith("t10k-labels")})
    name = "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError, match="truncated"):
        mnist.from_idx_gz(dict(files, **{name: files[name][:-20]}))
    with pytest.raises(DataError, match="not valid gzip"):
        mnist.from_idx_gz(dict(files, **{name: b"garbage" * 10}))


# ------------------------------------------------------------------------- pickle
@pytest.mark.parametrize("legacy_names", [False, True])
def test_from_pickle_gz_like_the_pypi_file(legacy_names: bool) -> None:
    arrays = synthetic_arrays(20, 10)
    data = pickle_gz(arrays, n_val=5, legacy_names=legacy_names)
    raw = gzip.decompress(data)
    assert (b"numpy.core.multiarray\n" in raw) == legacy_names
    back = mnist.from_pickle_gz(data)
    assert back.x_train.shape == (20, 28, 28) and back.x_test.shape == (10, 28, 28)
    # train + validation, in order, give back the original training set
    assert mnist.content_md5(back) == mnist.content_md5(arrays)


def _malicious(func, arg) -> bytes:
    class Payload:
        def __reduce__(self):
            return func, (arg,)

    return pickle.dumps(((Payload(), None), (None, None), (None, None)), protocol=2)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec"])
def test_restricted_unpickler_refuses_code_execution(tmp_path, kind: str) -> None:
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _malicious(os.system, f"touch {marker}")
    else:
        func = builtins.eval if kind == "builtins.eval" else builtins.exec
        payload = _malicious(func, f"open({str(marker)!r}, 'w').close()")
    with pytest.raises(DataError, match="not allowed"):
        mnist.from_pickle_gz(gzip.compress(payload))
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_numpy_globals() -> None:
    payload = pickle.dumps(np.arange(3), protocol=5)  # protocol 5 goes through numpy's _frombuffer
    with pytest.raises(DataError, match="not allowed"):
        mnist.from_pickle_gz(gzip.compress(payload))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ((1, 2), "3 \\(images, labels\\) pairs"),
        (((np.zeros((2, 784), np.float32), np.zeros(2, np.int64)),) * 2 + ((1, 2, 3),), "3 \\(images, labels\\) pairs"),
        (((np.zeros((2, 784), np.float32), [0, 1]),) * 3, "part 0 labels: expected 2 integers; got list"),
        (((np.zeros((2, 784), np.float64), np.zeros(2, np.int64)),) * 3, "float32"),
        (((np.full((2, 784), 0.3, np.float32), np.zeros(2, np.int64)),) * 3, "multiples of 1/256"),
        (((np.zeros((2, 784), np.float32), np.full(2, 10, np.int64)),) * 3, "labels must be"),
        (
            ((np.zeros((2, 784), np.float32), np.zeros(3, np.int64)),) * 3,
            r"part 0 labels: expected 2 integers; got ndarray int64 \(3,\)",
        ),
    ],
)
def test_from_pickle_gz_validates_structure(obj, match: str) -> None:
    # Py2-style writer: Python 3 protocol-2 pickles of bytes would need _codecs.encode.
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    with pytest.raises(DataError, match=match):
        mnist.from_pickle_gz(gzip.compress(data))


def test_from_pickle_gz_rejects_corrupt_gzip_and_trailing_data() -> None:
    good = pickle_gz(synthetic_arrays())
    with pytest.raises(DataError):
        mnist.from_pickle_gz(good[: len(good) // 2])
    with pytest.raises(DataError):
        mnist.from_pickle_gz(b"not gzip")
    raw = gzip.decompress(good)
    with pytest.raises(DataError, match="after the pickle"):
        mnist.from_pickle_gz(gzip.compress(raw + b"junk"))
