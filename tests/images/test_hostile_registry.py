"""Registries that attack: endless bodies, blobs longer than declared, digests that are paths,
odd Retry-After values, an https -> http downgrade, and other hosts fishing for credentials.
Every server here is a real HTTP server on a loopback socket."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from registries import FakeRegistry, serve

import aufs
from aufs.images import Catalog, import_images
from aufs.images.digests import CorruptBlobError
from aufs.images.pull import pull
from aufs.images.push import push
from aufs.images.registry import (
    MANIFEST_LIMIT,
    MAX_RETRY_WAIT,
    Credentials,
    RegistryAuthError,
    RegistryError,
    retry_after,
)
from aufs.images.sources import ImageSourceError
from conftest import FIXTURES, IS_ROOT, Harness

OCI = FIXTURES / "oci-sample"
ENDLESS = 64 << 20  # what an endless body sends at most before the test server gives up
CREDENTIALS = Credentials("carol", "secret-password")

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="pulled layers are mounted: that needs root"),
]


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    registry = FakeRegistry()
    registry.load_layout(OCI, "base")
    yield registry
    registry.close()


def manifest_of(fake: FakeRegistry) -> dict[str, Any]:
    return json.loads(fake.manifests["base"][0])  # type: ignore[no-any-return]


def pull_from(fake: FakeRegistry, scratch: Path, **options: Any) -> aufs.Driver:
    target = Harness("overlay").driver(scratch / "target")
    pull(target, Catalog(target.store), f"{fake.address}/peers/sample:base", **options)
    return target


def stored_layers(scratch: Path) -> list[str]:
    return aufs.Driver(scratch / "target", backend="overlay").layer_ids()


def send_endless(handler: Any, status: int = 200, headers: dict[str, str] | None = None,
                 piece: bytes = b"x" * 65536) -> int:
    """A chunked body that does not end (until ENDLESS bytes); returns what was sent before
    the client hung up."""
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    sent = 0
    try:
        while sent < ENDLESS:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass
    handler.close_connection = True
    return sent


# ---- 7. sizes and limits ------------------------------------------------------------------------


def test_a_blob_longer_than_declared_stops_at_the_declared_size(fake: FakeRegistry,
                                                               scratch: Path) -> None:
    layer = manifest_of(fake)["layers"][0]
    sent: queue.Queue[int] = queue.Queue()

    def endless_blob(handler: Any, path: str) -> bool:
        if path.endswith(layer["digest"]):
            sent.put(send_endless(handler))
            return True
        return False

    fake.faults.append(endless_blob)
    with pytest.raises(CorruptBlobError, match=f"more than the {layer['size']} bytes"):
        pull_from(fake, scratch)
    assert sent.get(timeout=120) < ENDLESS // 2  # the client hung up near the declared size
    assert stored_layers(scratch) == []


@pytest.mark.parametrize("where", ["manifest", "config", "error", "token"])
def test_endless_bodies_are_cut_off(fake: FakeRegistry, scratch: Path, where: str) -> None:
    config = manifest_of(fake)["config"]["digest"]
    sent: queue.Queue[int] = queue.Queue()

    def endless(handler: Any, path: str) -> bool:
        if where == "manifest" and "/manifests/" in path:
            sent.put(send_endless(handler, headers={"Content-Type": fake.manifests["base"][1]},
                                     piece=b" " * 65536))
        elif where == "config" and path.endswith(config):
            sent.put(send_endless(handler, piece=b" " * 65536))
        elif where == "error" and "/manifests/" in path:
            sent.put(send_endless(handler, 500))
        elif where == "token" and path == "/token":
            sent.put(send_endless(handler, piece=b" " * 65536))
        elif where == "token" and handler.headers.get("Authorization") is None:
            challenge = f'Bearer realm="http://{fake.address}/token",service="fake"'
            handler.send(401, b"{}", {"WWW-Authenticate": challenge})
        else:
            return False
        return True

    fake.faults.append(endless)
    with pytest.raises(RegistryError):
        pull_from(fake, scratch)
    count = sent.get(timeout=120)  # the server stops when the client hangs up
    assert count < ENDLESS // 2
    if where != "error":
        assert count < MANIFEST_LIMIT * 4


def test_a_stalled_blob_fails_the_pull(fake: FakeRegistry, scratch: Path) -> None:
    layer = manifest_of(fake)["layers"][0]
    release = threading.Event()

    def stall(handler: Any, path: str) -> bool:
        if path.endswith(layer["digest"]):
            handler.send_response(200)
            handler.send_header("Content-Length", str(layer["size"]))
            handler.end_headers()
            handler.wfile.write(fake.blobs[layer["digest"]][:1000])
            handler.wfile.flush()
            release.wait(120)  # then nothing more
            handler.close_connection = True
            return True
        return False

    fake.faults.append(stall)
    try:
        with pytest.raises(aufs.AufsError, match=r"timed out|stalled"):
            pull_from(fake, scratch, timeout=0.5)
    finally:
        release.set()
    assert stored_layers(scratch) == []


# ---- 8. digests are checked before they are used ----------------------------------------------


@pytest.mark.parametrize("which", ["config", "layer"])
def test_a_malformed_digest_is_refused_before_any_request(fake: FakeRegistry, scratch: Path,
                                                          which: str) -> None:
    manifest = manifest_of(fake)
    hostile = "sha256:../../../../other/secret?x="
    if which == "config":
        manifest["config"]["digest"] = hostile
    else:
        manifest["layers"][0]["digest"] = hostile
    body = json.dumps(manifest).encode()
    fake.manifests["base"] = (body, fake.manifests["base"][1])
    paths: list[str] = []

    def record(handler: Any, path: str) -> bool:
        paths.append(handler.path)
        return False

    fake.faults.append(record)
    with pytest.raises(ImageSourceError, match="malformed digest"):
        pull_from(fake, scratch)
    assert paths and all("manifests" in path for path in paths), paths
    assert stored_layers(scratch) == []


# ---- 9. Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Wed, 21 Oct 2015 07:28:00 GMT", "-3", "soon", "nan"])
def test_odd_retry_after_values_are_retried(fake: FakeRegistry, scratch: Path,
                                            value: str) -> None:
    budget = [2]

    def too_many(handler: Any, path: str) -> bool:
        if budget[0]:
            budget[0] -= 1
            handler.send(429, b"{}", {"Retry-After": value})
            return True
        return False

    fake.faults.append(too_many)
    assert len(pull_from(fake, scratch).layer_ids()) == 1
    assert budget == [0]


def test_retry_after_is_bounded() -> None:
    assert retry_after("Fri, 31 Dec 9999 23:59:59 GMT", 1) == MAX_RETRY_WAIT
    assert retry_after("100000", 1) == MAX_RETRY_WAIT
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1) == 0
    assert retry_after("-1", 1) == 0
    assert 0 < retry_after("", 1) <= MAX_RETRY_WAIT


# ---- 10. https -> http -----------------------------------------------------------------------


class _TlsOrPlain(ThreadingHTTPServer):
    """One port that speaks TLS to a client that starts a handshake, plain HTTP otherwise."""

    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = self.socket.accept()
        connection.settimeout(10)
        if connection.recv(1, socket.MSG_PEEK) == b"\x16":
            connection = self.context.wrap_socket(connection, server_side=True)
        connection.settimeout(None)
        return connection, address


class _FakeOn127002(FakeRegistry):
    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.port}"


@pytest.fixture
def tls_registry(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    """The fake registry on 127.0.0.2 (not a local name, so the client insists on https),
    with a certificate the client trusts through SSL_CERT_FILE."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    key, cert = scratch / "tls.key", scratch / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.2",
                    "-addext", "subjectAltName=IP:127.0.0.2"], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    registry = _FakeOn127002()
    registry.load_layout(OCI, "base")
    server = _TlsOrPlain(("127.0.0.2", 0), registry._handler())
    server.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.context.load_cert_chain(cert, key)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    registry.port = server.server_address[1]
    yield registry
    server.shutdown()
    registry.close()


def test_an_https_to_http_redirect_never_carries_credentials(tls_registry: FakeRegistry,
                                                            scratch: Path) -> None:
    plain: list[str | None] = []

    def downgrade(handler: Any, path: str) -> bool:
        if not isinstance(handler.connection, ssl.SSLSocket):
            plain.append(handler.headers.get("Authorization"))
            return False
        if not (handler.headers.get("Authorization") or "").startswith("Basic "):
            handler.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
            return True
        if "/blobs/" in path:
            handler.send(307, b"", {"Location": f"http://{tls_registry.address}{path}"})
            return True
        return False

    tls_registry.faults.append(downgrade)
    with pytest.raises(RegistryError, match="https to http"):
        pull_from(tls_registry, scratch, credentials=CREDENTIALS)
    assert any(tls_registry.seen_authorization)  # https did get the credentials
    assert not any(plain)


# ---- 11. other hosts -------------------------------------------------------------------------


def _recorder(seen: list[str | None], status: int = 201) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def answer(self) -> None:
            seen.append(self.headers.get("Authorization"))
            length = int(self.headers.get("Content-Length") or 0)
            while length:
                length -= len(self.rfile.read(min(length, 1 << 20)))
            if self.path.startswith("/token"):
                body = json.dumps({"token": "a-token"}).encode()
                self.send_response(200)
            else:
                body = b""
                self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = do_PATCH = do_POST = answer

    return Handler


def test_a_push_never_sends_credentials_to_an_upload_on_another_host(scratch: Path) -> None:
    source = Harness("overlay").driver(scratch / "source")
    catalog = Catalog(source.store)
    import_images(source, catalog, f"{OCI}:base")
    elsewhere: list[str | None] = []
    other = serve(_recorder(elsewhere))
    registry_seen: list[str | None] = []

    class Registry(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def answer(self) -> None:
            registry_seen.append(self.headers.get("Authorization"))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            headers = {}
            if not (self.headers.get("Authorization") or "").startswith("Basic "):
                status, headers = 401, {"WWW-Authenticate": 'Basic realm="fake"'}
            elif self.command == "HEAD":
                status = 404
            elif self.command == "POST":
                status = 202
                headers = {"Location": f"http://127.0.0.1:{other.server_address[1]}/upload/1"}
            else:
                status = 201
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = answer

    registry = serve(Registry)
    try:
        push(source, catalog, "base", f"127.0.0.1:{registry.server_address[1]}/peers/x:1",
             credentials=CREDENTIALS)
    finally:
        registry.shutdown()
        other.shutdown()
    assert any(registry_seen)
    assert elsewhere and not any(elsewhere), elsewhere


def test_a_plain_http_token_realm_on_another_host_gets_no_credentials(fake: FakeRegistry,
                                                                      scratch: Path) -> None:
    seen: list[str | None] = []
    tokens = ThreadingHTTPServer(("127.0.0.2", 0), _recorder(seen))
    threading.Thread(target=tokens.serve_forever, daemon=True).start()
    realm = f"http://127.0.0.2:{tokens.server_address[1]}/token"

    def bearer(handler: Any, path: str) -> bool:
        if handler.headers.get("Authorization") != "Bearer a-token":
            handler.send(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}"'})
            return True
        return False

    fake.faults.append(bearer)
    try:
        assert len(pull_from(fake, scratch, credentials=CREDENTIALS).layer_ids()) == 1
    finally:
        tokens.shutdown()
    assert seen and not any(seen)


def test_a_redirected_host_cannot_ask_for_credentials(fake: FakeRegistry, scratch: Path) -> None:
    storage_seen: list[str | None] = []
    storage_blobs = dict(fake.blobs)

    class Storage(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            storage_seen.append(self.headers.get("Authorization"))
            port = self.server.server_address[1]
            if self.path.startswith("/token") or not self.headers.get("Authorization"):
                challenge = f'Bearer realm="http://127.0.0.1:{port}/token"'
                body = b"{}"
                self.send_response(401)
                self.send_header("WWW-Authenticate", challenge)
            else:
                body = storage_blobs[self.path.rsplit("/", 1)[-1]]
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    storage = serve(Storage)

    def redirect(handler: Any, path: str) -> bool:
        if not (handler.headers.get("Authorization") or "").startswith("Basic "):
            handler.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
            return True
        if "/blobs/" in path and path.endswith(manifest_of(fake)["layers"][0]["digest"]):
            location = f"http://127.0.0.1:{storage.server_address[1]}/storage{path}"
            handler.send(307, b"", {"Location": location})
            return True
        return False

    fake.faults.append(redirect)
    try:
        with pytest.raises(RegistryAuthError):
            pull_from(fake, scratch, credentials=CREDENTIALS)
    finally:
        storage.shutdown()
    assert storage_seen and not any(storage_seen), storage_seen
