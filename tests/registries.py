"""Registries for the tests: the real one (Debian's docker-registry, CNCF Distribution 2.8)
on 127.0.0.1 with anonymous, htpasswd or token auth, a token service that signs JWTs the
registry accepts, and a fake registry that misbehaves on purpose."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """An HTTP server on a free 127.0.0.1 port, answering from a thread of its own."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for(url: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 is an answer)
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up")


@contextlib.contextmanager
def real_registry(base: Path, auth: dict[str, Any] | None = None) -> Iterator[str]:
    """docker-registry serving on 127.0.0.1; yields "127.0.0.1:PORT"."""
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(base / "data")},
                    "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if auth:
        config["auth"] = auth
    base.mkdir(parents=True, exist_ok=True)
    path = base / "config.yml"
    path.write_text(json.dumps(config))  # YAML is a superset of JSON
    process = subprocess.Popen(["docker-registry", "serve", str(path)],
                               stdout=subprocess.DEVNULL, stderr=(base / "log").open("w"))
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def htpasswd(path: Path, user: str, password: str) -> None:
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True,
                   capture_output=True)


# ---- a token service ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """Issues RS256 JWTs with the certificate in x5c, as the registry's token auth expects;
    checks basic credentials first. Signs with the openssl command line."""

    def __init__(self, base: Path, user: str, password: str) -> None:
        self.key = base / "token.key"
        self.cert = base / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(self.key), "-out", str(self.cert), "-days", "2", "-subj",
                        "/CN=aufs-test-token"], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.requests: list[str] = []
        self.server = serve(self._handler())
        self.port = self.server.server_address[1]

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing_input.encode(), check=True,
                                   capture_output=True).stdout
        return f"{signing_input}.{_b64(signature)}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                service.requests.append(query.get("scope", ""))
                if self.headers.get("Authorization") != service.expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", "").split(" "):
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    if kind:
                        access.append({"type": kind, "name": name,
                                       "actions": actions.split(",")})
                now = int(time.time())
                token = service.sign({"iss": "aufs-test", "sub": "tester",
                                      "aud": query.get("service", ""), "exp": now + 300,
                                      "nbf": now - 10, "iat": now, "jti": str(now),
                                      "access": access})
                body = json.dumps({"token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def registry_auth(self) -> dict[str, Any]:
        return {"token": {"realm": self.realm, "service": "aufs-test-registry",
                          "issuer": "aufs-test", "rootcertbundle": str(self.cert)}}

    def close(self) -> None:
        self.server.shutdown()


# ---- a registry that misbehaves ---------------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """Serves one repository's manifests and blobs from memory. `faults` changes answers:
    a callable (handler, path) -> True when it answered itself."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.faults: list[Callable[[BaseHTTPRequestHandler, str], bool]] = []
        self.seen_authorization: list[str | None] = []
        self.server = serve(self._handler())
        self.port = self.server.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def load_layout(self, layout: Path, tag: str) -> None:
        """Copies a tag of an OCI layout into the fake registry."""
        index = json.loads((layout / "index.json").read_text())
        (entry,) = [m for m in index["manifests"]
                    if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
        blobs = layout / "blobs" / "sha256"
        manifest = (blobs / entry["digest"][7:]).read_bytes()
        media = json.loads(manifest).get("mediaType", "application/vnd.oci.image.manifest.v1+json")
        self.manifests[tag] = (manifest, media)
        self.manifests[digest_of(manifest)] = (manifest, media)
        data = json.loads(manifest)
        for descriptor in [data["config"], *data["layers"]]:
            self.blobs[descriptor["digest"]] = (blobs / descriptor["digest"][7:]).read_bytes()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
                     ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                registry.seen_authorization.append(self.headers.get("Authorization"))
                path = urllib.parse.urlsplit(self.path).path
                for fault in registry.faults:
                    if fault(self, path):
                        return
                parts = path.split("/")
                if "manifests" in parts:
                    entry = registry.manifests.get(parts[-1])
                    if entry is None:
                        self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                        return
                    self.send(200, entry[0], {"Content-Type": entry[1],
                                              "Docker-Content-Digest": digest_of(entry[0])})
                elif "blobs" in parts:
                    blob = registry.blobs.get(parts[-1])
                    if blob is None:
                        self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                        return
                    self.send(200, blob, {"Content-Type": "application/octet-stream"})
                else:
                    self.send(200, b"{}")

            do_HEAD = do_GET

        return Handler

    def close(self) -> None:
        self.server.shutdown()

