"""The graphdriver plugin over its socket, without dockerd: each call as Docker's client sends
it (JSON bodies, a chunked ApplyDiff body, streamed Diff replies), errors as {"Err"}, a
restarted plugin, stale and live sockets, and SIGTERM. tests/docker/test_plugin_daemon.py
runs the real daemon on it."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aufs
from aufs.docker.plugin import GraphDriverPlugin, InitRequest, init_record_path
from aufs.docker.pluginhttp import PluginServer, SocketInUseError
from conftest import Harness
from tarbuild import archive, directory, member

BASE = "a" * 64
CHILD = "b" * 64
LAYER_TAR = archive([directory("etc"), member("etc/hosts", data=b"127.0.0.1 here\n"),
                     member("big", data=os.urandom(3 << 20))])


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("plugin")
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


class Client:
    """Docker's plugin client, as far as these tests need: one kept-alive connection."""

    def __init__(self, path: str, plugin: GraphDriverPlugin | None = None) -> None:
        self.connection = UnixConnection(path)
        self.plugin = plugin

    def raw(self, method: str, body: bytes | Iterable[bytes] = b"", *, chunked: bool = False
            ) -> http.client.HTTPResponse:
        headers = {"Accept": "application/vnd.docker.plugins.v1.2+json"}
        self.connection.request("POST", "/" + method, body=body, headers=headers,
                                encode_chunked=chunked)
        return self.connection.getresponse()

    def call(self, method: str, args: dict[str, Any] | None = None, *, status: int = 200
             ) -> dict[str, Any]:
        response = self.raw(method, json.dumps(args).encode() if args is not None else b"")
        payload = json.loads(response.read())
        assert response.status == status, payload
        assert response.getheader("Content-Type") == "application/vnd.docker.plugins.v1+json"
        return dict(payload)


@contextlib.contextmanager
def serving(plugin: GraphDriverPlugin, path: Path) -> Iterator[Client]:
    server = PluginServer(str(path), plugin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(str(path), plugin)
    finally:
        server.shutdown()
        server.server_close()
        plugin.close()


def new_plugin(harness: Harness, scratch: Path, **kwargs: Any) -> GraphDriverPlugin:
    return GraphDriverPlugin(record_path=init_record_path(str(scratch / "p.sock")),
                             driver_factory=lambda root, init: harness.driver(root), **kwargs)


@pytest.fixture
def client(harness: Harness, scratch: Path) -> Iterator[Client]:
    with serving(new_plugin(harness, scratch), scratch / "p.sock") as connected:
        assert connected.call("Plugin.Activate") == {"Implements": ["GraphDriver"]}
        assert connected.call("GraphDriver.Init", {"Home": str(scratch / "home"), "Opts": [],
                                                   "UIDMaps": None, "GIDMaps": None}) == {}
        yield connected


def test_every_call_round_trips(client: Client, scratch: Path, harness: Harness) -> None:
    home = scratch / "home"
    assert client.call("GraphDriver.Create", {"ID": BASE}) == {}
    response = client.raw(f"GraphDriver.ApplyDiff?id={BASE}&parent=",
                          (LAYER_TAR[i:i + 65536] for i in range(0, len(LAYER_TAR), 65536)),
                          chunked=True)
    assert response.status == 200
    assert json.loads(response.read()) == {"Size": (3 << 20) + len(b"127.0.0.1 here\n")}
    assert (home / "diff" / BASE / "etc" / "hosts").read_bytes() == b"127.0.0.1 here\n"
    assert client.call("GraphDriver.CreateReadWrite", {"ID": CHILD, "Parent": BASE,
                                                       "MountLabel": ""}) == {}
    assert client.call("GraphDriver.Exists", {"ID": CHILD}) == {"Exists": True}
    assert client.call("GraphDriver.Exists", {"ID": "c" * 64}) == {"Exists": False}
    assert client.call("GraphDriver.Exists", {"ID": "../x"}) == {"Exists": False}
    directory_path = client.call("GraphDriver.Get", {"ID": CHILD})["Dir"]
    assert directory_path == str(home / "mnt" / CHILD)
    assert harness.is_mounted(directory_path)
    if harness.real_union:
        Path(directory_path, "etc", "added").write_text("new\n")
    else:
        (home / "diff" / CHILD / "etc").mkdir()
        (home / "diff" / CHILD / "etc" / "added").write_text("new\n")
    assert client.call("GraphDriver.Put", {"ID": CHILD}) == {}
    assert not harness.is_mounted(directory_path)
    changes = client.call("GraphDriver.Changes", {"ID": CHILD, "Parent": BASE})["Changes"]
    assert changes == [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/added", "Kind": 1}]
    assert client.call("GraphDriver.DiffSize", {"ID": CHILD, "Parent": BASE}) == {"Size": 4}
    status = dict(client.call("GraphDriver.Status")["Status"])
    assert status["Root Dir"] == str(home) and status["Dirs"] == "2"
    metadata = client.call("GraphDriver.GetMetadata", {"ID": CHILD})["Metadata"]
    assert metadata["UpperDir"] == str(home / "diff" / CHILD)
    capabilities = client.call("GraphDriver.Capabilities")["Capabilities"]
    exact = bool(getattr(client.plugin.driver, "reproduces_exact_diffs", False))
    assert capabilities == {"ReproducesExactDiffs": exact}

    response = client.raw("GraphDriver.Diff", json.dumps({"ID": BASE}).encode())
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    with tarfile.open(fileobj=io.BytesIO(response.read())) as tar:
        assert {m.name: m.size for m in tar if m.isfile()} == {"etc/hosts": 15, "big": 3 << 20}
    assert client.call("GraphDriver.Remove", {"ID": CHILD}) == {}
    assert client.call("GraphDriver.Remove", {"ID": CHILD}) == {}  # again: Docker's answer
    assert client.call("GraphDriver.Cleanup") == {}


def test_errors_are_err_replies(client: Client) -> None:
    error = client.call("GraphDriver.Get", {"ID": BASE}, status=500)
    assert "does not exist" in error["Err"]
    assert "no ID" in client.call("GraphDriver.Get", {}, status=500)["Err"]
    assert client.call("GraphDriver.Create", {"ID": BASE}) == {}
    assert "already exists" in client.call("GraphDriver.Create", {"ID": BASE}, status=500)["Err"]
    assert "storage-opt" in client.call("GraphDriver.Create", {"ID": CHILD, "StorageOpt":
                                                               {"size": "1G"}}, status=500)["Err"]
    assert "no such call" in client.call("VolumeDriver.Mount", {}, status=404)["Err"]
    response = client.raw("GraphDriver.Exists", b"{nope")
    assert response.status == 400 and "not JSON" in json.loads(response.read())["Err"]
    # the connection still serves the next call
    assert client.call("GraphDriver.Exists", {"ID": BASE}) == {"Exists": True}


def test_a_bad_archive_applies_nothing_and_the_connection_survives(
        client: Client, scratch: Path) -> None:
    client.call("GraphDriver.Create", {"ID": BASE})
    hostile = archive([member("ok", data=b"x"), member("../escape", data=b"x")])
    response = client.raw(f"GraphDriver.ApplyDiff?id={BASE}&parent=", [hostile], chunked=True)
    assert response.status == 500 and "escape" in json.loads(response.read())["Err"]
    assert os.listdir(scratch / "home" / "diff" / BASE) == []
    assert not (scratch / "escape").exists()
    # a chunked body cut short: an error, and nothing applied
    response = client.raw(f"GraphDriver.ApplyDiff?id={BASE}&parent=",
                          b"%x\r\n" % len(LAYER_TAR) + LAYER_TAR[:1000] + b"\r\n0\r\n\r\n",
                          chunked=False)
    assert response.status in (400, 500)
    response.read()
    assert os.listdir(scratch / "home" / "diff" / BASE) == []
    response = client.raw("GraphDriver.ApplyDiff?parent=", [hostile], chunked=True)
    assert response.status == 500 and "needs ?id=" in json.loads(response.read())["Err"]
    assert client.call("GraphDriver.Exists", {"ID": BASE}) == {"Exists": True}


def test_a_diff_that_breaks_midway_is_not_a_short_tar(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    client.call("GraphDriver.Create", {"ID": BASE})

    class Broken(io.RawIOBase):
        sent = False

        def readinto(self, buffer: Any) -> int:
            if self.sent:
                raise OSError(5, "Input/output error")
            self.sent = True
            buffer[:512] = b"\0" * 512
            return 512

    monkeypatch.setattr(aufs.Driver, "diff", lambda self, layer, parent="": Broken())
    response = client.raw("GraphDriver.Diff", json.dumps({"ID": BASE}).encode())
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()


def test_a_restarted_plugin_serves_the_store_of_the_last_init(
        harness: Harness, scratch: Path) -> None:
    with serving(new_plugin(harness, scratch), scratch / "p.sock") as first:
        first.call("GraphDriver.Init", {"Home": str(scratch / "home")})
        first.call("GraphDriver.Create", {"ID": BASE})
        first.call("GraphDriver.Create", {"ID": CHILD, "Parent": BASE})
        first.call("GraphDriver.Get", {"ID": CHILD})
    record = json.loads(Path(init_record_path(str(scratch / "p.sock"))).read_text())
    assert record == InitRequest(str(scratch / "home")).to_json()
    # no Init this time: dockerd sent it to the plugin before
    with serving(new_plugin(harness, scratch), scratch / "p.sock") as second:
        assert second.call("GraphDriver.Exists", {"ID": CHILD}) == {"Exists": True}
        second.call("GraphDriver.Get", {"ID": CHILD})
        second.call("GraphDriver.Put", {"ID": CHILD})
        # the first plugin's get is lost with it: Docker's put of it still succeeds
        assert second.call("GraphDriver.Put", {"ID": CHILD}) == {}


def test_root_overrides_home(harness: Harness, scratch: Path) -> None:
    plugin = new_plugin(harness, scratch, root=str(scratch / "mine"))
    with serving(plugin, scratch / "p.sock") as connected:
        connected.call("GraphDriver.Init", {"Home": str(scratch / "home")})
        connected.call("GraphDriver.Create", {"ID": BASE})
    assert (scratch / "mine" / "layers" / BASE).exists()
    assert not (scratch / "home").exists()


def test_uid_maps_reach_the_driver(scratch: Path) -> None:
    seen: list[InitRequest] = []

    def factory(root: str, init: InitRequest) -> aufs.Driver:
        seen.append(init)
        raise aufs.NotSupportedError("recorded")

    plugin = GraphDriverPlugin(driver_factory=factory)
    with serving(plugin, scratch / "p.sock") as connected:
        maps = [{"container_id": 0, "host_id": 100000, "size": 65536}]
        error = connected.call("GraphDriver.Init", {"Home": "/h", "Opts": ["a=b"],
                                                    "UIDMaps": maps, "GIDMaps": maps}, status=500)
    assert "recorded" in error["Err"]
    assert seen == [InitRequest("/h", ("a=b",), ((0, 100000, 65536),), ((0, 100000, 65536),))]


def test_sockets_stale_live_and_removed(harness: Harness, scratch: Path) -> None:
    path = scratch / "p.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # what a killed plugin leaves: a socket nobody listens on
    with serving(new_plugin(harness, scratch), path) as connected:
        assert connected.call("Plugin.Activate")["Implements"] == ["GraphDriver"]
        with pytest.raises(SocketInUseError):
            PluginServer(str(path), new_plugin(harness, scratch))
        assert path.is_socket()
    assert not path.exists()


def test_sigterm_unmounts_and_removes_the_socket(harness: Harness, scratch: Path) -> None:
    if harness.name != "overlay" and harness.name != "fuse-overlayfs":
        pytest.skip("the command line mounts for real: overlay and fuse-overlayfs only")
    path = scratch / "p.sock"
    plugin = subprocess.Popen(
        [sys.executable, "-m", "aufs", "docker-plugin", "--name", "unused", "--socket",
         str(path), "--root", str(scratch / "store"), "--backend", harness.name],
        stderr=subprocess.PIPE, text=True)
    try:
        while not path.is_socket():
            assert plugin.poll() is None, plugin.communicate()[1]
            time.sleep(0.05)
        connected = Client(str(path))
        connected.call("GraphDriver.Create", {"ID": BASE})
        connected.call("GraphDriver.Create", {"ID": CHILD, "Parent": BASE})
        mounted = connected.call("GraphDriver.Get", {"ID": CHILD})["Dir"]
        assert harness.is_mounted(mounted)
        connected.connection.close()
        plugin.send_signal(signal.SIGTERM)
        assert plugin.wait(60) == 0
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait()
    assert not path.exists()
    assert not harness.is_mounted(mounted)
    assert (scratch / "store" / "layers" / CHILD).exists()


def test_a_body_in_tiny_chunks_with_extensions_and_trailers(client: Client,
                                                            scratch: Path) -> None:
    """Go's client writes a layer as it reads it: a chunk per 512-byte tar header."""
    client.call("GraphDriver.Create", {"ID": BASE})
    body = b"".join(b"%x;note=1\r\n" % len(LAYER_TAR[i:i + 512]) + LAYER_TAR[i:i + 512] + b"\r\n"
                    for i in range(0, len(LAYER_TAR), 512)) + b"0\r\nX-Trailer: 1\r\n\r\n"
    client.connection.putrequest("POST", f"/GraphDriver.ApplyDiff?id={BASE}&parent=")
    client.connection.putheader("Transfer-Encoding", "chunked")
    client.connection.endheaders(body)
    response = client.connection.getresponse()
    assert response.status == 200, response.read()
    assert json.loads(response.read())["Size"] == (3 << 20) + 15
    assert (scratch / "home" / "diff" / BASE / "etc" / "hosts").read_bytes() == b"127.0.0.1 here\n"
    assert client.call("GraphDriver.Exists", {"ID": BASE}) == {"Exists": True}  # same connection


@pytest.mark.parametrize(("arguments", "root"), [
    (["docker-plugin", "--name", "n"], None),
    (["docker-plugin", "--name", "n", "--root", "/given"], "/given"),
    (["--root", "/given", "docker-plugin", "--name", "n"], "/given"),
])
def test_without_root_the_store_is_dockers_home(arguments: list[str], root: str | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from aufs.cli.docker_plugin import explicit_root
    from aufs.cli.main import build_parser

    monkeypatch.delenv("AUFS_ROOT", raising=False)
    assert explicit_root(build_parser().parse_args(arguments)) == root
