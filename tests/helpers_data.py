"""Test helpers: tiny synthetic MNIST in every source format, and loopback servers."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import socket
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.mnist import IDX_GZ_FILES, MnistArrays, content_md5, to_idx, write_npz


def synthetic_arrays(n_train: int = 20, n_test: int = 10, seed: int = 0) -> MnistArrays:
    """Random uint8 images and labels 0..9 shaped like MNIST."""
    rng = np.random.default_rng(seed)
    return MnistArrays(
        x_train=rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, size=n_train, dtype=np.uint8),
        x_test=rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, size=n_test, dtype=np.uint8),
    )


def npz_bytes(arrays: MnistArrays) -> bytes:
    """The arrays as a Keras-layout ``.npz``, written as the fetch stage writes it."""
    buf = io.BytesIO()
    write_npz(buf, arrays.as_npz())
    return buf.getvalue()


def idx_gz_files(arrays: MnistArrays) -> dict[str, bytes]:
    """The four classic ``*-ubyte.gz`` files for ``arrays``."""
    by_key = arrays.by_content_key()
    return {name: gzip.compress(to_idx(by_key[key]), mtime=0) for name, key in IDX_GZ_FILES.items()}


class Py2StylePickler(pickle.Pickler):
    """Pickles ndarrays the way Python 2 NumPy did: raw data as a (latin1) string, not bytes.

    Python 3's protocol-2 pickles of bytes go through ``_codecs.encode``; the real file
    has no such global, so neither does this one.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray:
            from pipeline.mnist import _reconstruct

            raw = np.ascontiguousarray(obj).tobytes().decode("latin1")
            return _reconstruct, (np.ndarray, (0,), "b"), (1, obj.shape, obj.dtype, False, raw)
        return NotImplemented


def pickle_gz(arrays: MnistArrays, n_val: int = 5, legacy_names: bool = False) -> bytes:
    """A gzipped pickle built like the PyPI one: three (float32 (n,784) / 256, int64) pairs."""

    def pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / np.float32(256), y.astype(np.int64))

    n_tr = len(arrays.x_train) - n_val
    obj = (
        pair(arrays.x_train[:n_tr], arrays.y_train[:n_tr]),
        pair(arrays.x_train[n_tr:], arrays.y_train[n_tr:]),
        pair(arrays.x_test, arrays.y_test),
    )
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    if legacy_names:  # the name Python-2-era NumPy wrote; GLOBAL opcodes are newline-terminated text
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return gzip.compress(data, mtime=0)


def make_wheel(path: Path, project: str, version: str, member: str, payload: bytes) -> str:
    """A minimal but valid wheel holding ``payload`` at ``member``; returns its sha256."""
    dist = f"{project.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return sha256(path.read_bytes())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Dataset:
    """One synthetic dataset in every encoding a mirror can serve."""

    arrays: MnistArrays
    npz: bytes
    idx_gz: dict[str, bytes]
    pickle_gz: bytes
    content_md5: dict[str, str]


def make_dataset(n_train: int = 20, n_test: int = 10, seed: int = 0) -> Dataset:
    arrays = synthetic_arrays(n_train, n_test, seed)
    return Dataset(arrays, npz_bytes(arrays), idx_gz_files(arrays), pickle_gz(arrays), content_md5(arrays))


def write_params(
    path: Path, fetch: Mapping[str, Any] | None = None, preprocess: Mapping[str, Any] | None = None
) -> Path:
    """Write a params.yaml with the given sections (plain dicts)."""
    data: dict[str, Any] = {}
    if fetch is not None:
        data["fetch"] = dict(fetch)
    if preprocess is not None:
        data["preprocess"] = dict(preprocess)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------ servers
@dataclass
class Truncated:
    """Announce ``len(data) + missing`` bytes, send ``data``, close the connection."""

    data: bytes
    missing: int = 1000


@dataclass
class Trickle:
    """Send a byte every ``interval`` seconds forever (in the headers or in the body)."""

    interval: float = 0.1
    in_headers: bool = False


@dataclass
class Redirect:
    """Answer 302 with ``location``."""

    location: str


Route = bytes | Truncated | Trickle | Redirect


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: Mapping[str, Route] = {}
    hits: list[str]
    stop: threading.Event

    def do_GET(self) -> None:
        self.hits.append(self.path)
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        try:
            if isinstance(route, Trickle):
                self._trickle(route)
                return
            if isinstance(route, Redirect):
                self.send_response(302)
                self.send_header("Location", route.location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = route.data if isinstance(route, Truncated) else route
            length = len(body) + (route.missing if isinstance(route, Truncated) else 0)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up; nothing to do
        self.close_connection = True

    def _trickle(self, route: Trickle) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        if not route.in_headers:
            self.wfile.write(b"Content-Length: 100000000\r\n\r\n")
        self.wfile.flush()
        while not self.stop.wait(route.interval):
            self.wfile.write(b"a")
            self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve(routes: Mapping[str, Route]) -> Iterator[tuple[str, list[str]]]:
    """Serve ``routes`` (path -> body or behaviour) on 127.0.0.1; yields (base URL, request log)."""
    stop = threading.Event()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"routes": dict(routes), "hits": hits, "stop": stop})
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as port:
        try:
            yield f"http://127.0.0.1:{port}", hits
        finally:
            stop.set()


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve a folder over http on 127.0.0.1 (a PEP 503 index is just folders of index.html)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler: Callable[..., Any] = functools.partial(Quiet, directory=str(root))
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as port:
        yield f"http://127.0.0.1:{port}"


@contextmanager
def serving(server: http.server.ThreadingHTTPServer) -> Iterator[int]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def stalling_server() -> Iterator[str]:
    """A port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    start = time.monotonic()
    yield lambda: time.monotonic() - start


def write_simple_index(root: Path, project: str, wheel: Path) -> None:
    """Lay out ``root/simple/<project>/index.html`` linking ``root/files/<wheel>``."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / wheel.name).write_bytes(wheel.read_bytes())
    page = root / "simple" / project
    page.mkdir(parents=True, exist_ok=True)
    (page / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../files/{wheel.name}">{wheel.name}</a></body></html>\n',
        encoding="utf-8",
    )
