"""Docker's graphdriver plugin protocol, served by an `aufs.Driver`, so that dockerd keeps its
images and containers in this store.

Who speaks it: dockerd from 1.13 through 27, with `--experimental` only, for a "v1" plugin
found by name at /run/docker/plugins/NAME.sock (or a .spec/.json file in /etc/docker/plugins).
Docker 28 removed graphdriver plugins. Docker 24 removed its built-in aufs driver, so from 24
on `--storage-driver aufs` falls through to a plugin named aufs; earlier versions (20.10 is
Debian 12's) keep a built-in aufs, so serve those under another name.

The protocol (Docker's daemon/graphdriver/proxy.go is the client): plugin v1, HTTP POST with
JSON bodies of type application/vnd.docker.plugins.v1+json. /Plugin.Activate answers
{"Implements": ["GraphDriver"]}; then every /GraphDriver.* call maps to one Driver method:
Init {Home, Opts, UIDMaps, GIDMaps}; Create and CreateReadWrite {ID, Parent, MountLabel,
StorageOpt}; Remove, Get -> {Dir}, Put, Exists -> {Exists}, GetMetadata -> {Metadata}
{ID, MountLabel}; Status -> {Status: [[k, v]...]}; Cleanup; Capabilities ->
{Capabilities: {ReproducesExactDiffs}}; Diff {ID, Parent} -> the raw tar, streamed;
Changes -> {Changes: [{Path, Kind}]}; ApplyDiff?id=&parent= with the tar as the request
body -> {Size}; DiffSize -> {Size}. A failure answers status 500 with {"Err": "..."}.

Docker sends Init once, when the daemon starts. The plugin records it next to its socket, so
a plugin restarted while the daemon runs serves the same store again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aufs.docker.pluginhttp import PluginCall, PluginProtocolError, PluginReply, PluginServer
from aufs.errors import (
    AufsError,
    InvalidLayerIDError,
    LayerNotFoundError,
    UnbalancedPutError,
)
from aufs.store.atomic import atomic_write
from aufs.store.driver import CreateOpts, Driver

log = logging.getLogger(__name__)

PLUGINS_DIR = "/run/docker/plugins"
IMPLEMENTS = ["GraphDriver"]


class PluginError(AufsError):
    """A graphdriver call that cannot be served as asked."""


PLUGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_socket(name: str) -> str:
    """Where dockerd looks for a v1 plugin called name."""
    if not PLUGIN_NAME.fullmatch(name):
        raise ValueError(f"bad plugin name {name[:80]!r}: use up to 64 letters, digits, "
                         "'.', '_' or '-', starting with a letter or digit")
    return os.path.join(PLUGINS_DIR, name + ".sock")


def init_record_path(socket_path: str) -> str:
    """The file that keeps Docker's Init next to the socket (dockerd only looks at sockets
    there, so it ignores it)."""
    base, _ = os.path.splitext(socket_path)
    return base + ".init.json"


@dataclass(frozen=True)
class InitRequest:
    """GraphDriver.Init as Docker sends it. Maps are (container_id, host_id, size)."""

    home: str
    options: tuple[str, ...] = ()
    uid_maps: tuple[tuple[int, int, int], ...] = ()
    gid_maps: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InitRequest:
        def maps(key: str) -> tuple[tuple[int, int, int], ...]:
            return tuple((int(entry["container_id"]), int(entry["host_id"]), int(entry["size"]))
                         for entry in data.get(key) or ())

        return cls(str(data.get("Home") or ""), tuple(str(o) for o in data.get("Opts") or ()),
                   maps("UIDMaps"), maps("GIDMaps"))

    def to_json(self) -> dict[str, Any]:
        def maps(triples: Sequence[tuple[int, int, int]]) -> list[dict[str, int]]:
            return [{"container_id": c, "host_id": h, "size": s} for c, h, s in triples]

        return {"Home": self.home, "Opts": list(self.options), "UIDMaps": maps(self.uid_maps),
                "GIDMaps": maps(self.gid_maps)}


DriverFactory = Callable[[str, InitRequest], Driver]


class GraphDriverPlugin:
    """The protocol's calls on one Driver. Thread-safe: the Driver locks per layer, and this
    class only guards which Driver is current.

    root overrides Init's Home (`--root`); record_path, when given, keeps the last Init.
    """

    def __init__(self, *, root: str | None = None, backend: str = "auto",
                 record_path: str | None = None,
                 driver_factory: DriverFactory | None = None) -> None:
        self.root = os.path.abspath(root) if root else None
        self.backend = backend
        self.record_path = record_path
        self._driver_factory = driver_factory or self._open_driver
        self._driver: Driver | None = None
        self._init: InitRequest | None = None
        self._guard = threading.Lock()
        self._calls: dict[str, Callable[[PluginCall], dict[str, Any]]] = {
            "Plugin.Activate": lambda call: {"Implements": IMPLEMENTS},
            "GraphDriver.Init": self._init_call,
            "GraphDriver.Create": lambda call: self._create(call, read_write=False),
            "GraphDriver.CreateReadWrite": lambda call: self._create(call, read_write=True),
            "GraphDriver.Remove": self._remove,
            "GraphDriver.Get": self._get,
            "GraphDriver.Put": self._put,
            "GraphDriver.Exists": self._exists,
            "GraphDriver.Status": self._status,
            "GraphDriver.GetMetadata": self._get_metadata,
            "GraphDriver.Cleanup": self._cleanup,
            "GraphDriver.Capabilities": self._capabilities,
            "GraphDriver.Changes": self._changes,
            "GraphDriver.ApplyDiff": self._apply_diff,
            "GraphDriver.DiffSize": self._diff_size,
        }

    # ---- dispatch -------------------------------------------------------------------------

    def __call__(self, call: PluginCall) -> PluginReply:
        log.debug("call %s %s", call.method, dict(call.query) or "")
        started = time.perf_counter()
        try:
            if call.method == "GraphDriver.Diff":
                return PluginReply(stream=self._diff(call))
            handler = self._calls.get(call.method)
            if handler is None:
                return PluginReply(404, {"Err": f"{call.method}: no such call; this plugin "
                                                f"implements {', '.join(IMPLEMENTS)}"})
            return PluginReply(200, handler(call))
        except PluginProtocolError:
            raise  # the transport answers 400: the request itself is broken
        except (AufsError, OSError, ValueError) as error:
            message = " ".join((str(error) or type(error).__name__).split())
            log.info("%s failed: %s", call.method, message)
            return PluginReply(500, {"Err": message})
        finally:
            log.debug("%s answered in %.3f s", call.method, time.perf_counter() - started)

    # ---- the driver -----------------------------------------------------------------------

    def _open_driver(self, root: str, init: InitRequest) -> Driver:
        return Driver(root, init.options, init.uid_maps or None, init.gid_maps or None,
                      backend=self.backend)

    @property
    def driver(self) -> Driver:
        """The current Driver. Before any Init, the one the last Init recorded (a plugin
        restarted while dockerd runs), or the --root store."""
        with self._guard:
            if self._driver is None:
                init = self._init or self._read_record()
                if init is None and self.root is None:
                    raise PluginError("no GraphDriver.Init yet: start the plugin before dockerd "
                                      "(or give it --root)")
                self._start(init or InitRequest(self.root or ""))
            assert self._driver is not None
            return self._driver

    def _start(self, init: InitRequest) -> None:
        root = self.root or init.home
        if not root:
            raise PluginError("GraphDriver.Init sent no Home, and the plugin has no --root")
        self._driver = self._driver_factory(root, init)
        self._init = init
        log.info("serving %s (backend %s)", self._driver.root, self._driver.backend)

    def _read_record(self) -> InitRequest | None:
        if not self.record_path:
            return None
        try:
            with open(self.record_path) as handle:
                return InitRequest.from_json(json.load(handle))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            log.warning("ignoring %s: %s", self.record_path, error)
            return None

    def _write_record(self, init: InitRequest) -> None:
        if not self.record_path:
            return
        directory = os.path.dirname(self.record_path) or "."
        atomic_write(self.record_path, json.dumps(init.to_json()).encode(), temp_dir=directory,
                     mode=0o600)

    def close(self) -> None:
        """Unmounts every mount of the store that no other process holds."""
        with self._guard:
            driver, self._driver = self._driver, None
        if driver is not None:
            driver.cleanup()

    # ---- the calls ------------------------------------------------------------------------

    def _init_call(self, call: PluginCall) -> dict[str, Any]:
        init = InitRequest.from_json(call.json())
        with self._guard:
            if self._driver is not None and init == self._init:
                return {}
            old, self._driver = self._driver, None
            if old is not None:
                old.cleanup()
            self._start(init)
            self._write_record(init)
        return {}

    def _create(self, call: PluginCall, *, read_write: bool) -> dict[str, Any]:
        request = call.json()
        opts = CreateOpts(mount_label=str(request.get("MountLabel") or ""),
                          storage_opt=dict(request.get("StorageOpt") or {}))
        create = self.driver.create_read_write if read_write else self.driver.create
        create(_layer_id(request), str(request.get("Parent") or ""), opts)
        return {}

    def _remove(self, call: PluginCall) -> dict[str, Any]:
        # Docker's drivers remove a missing layer without error, so a retry succeeds
        with contextlib.suppress(LayerNotFoundError):
            self.driver.remove(_layer_id(call.json()))
        return {}

    def _get(self, call: PluginCall) -> dict[str, Any]:
        request = call.json()
        return {"Dir": self.driver.get(_layer_id(request), str(request.get("MountLabel") or ""))}

    def _put(self, call: PluginCall) -> dict[str, Any]:
        layer_id = _layer_id(call.json())
        try:
            self.driver.put(layer_id)
        except UnbalancedPutError:
            # A restarted plugin has lost the gets of the one before it; Docker's drivers
            # ignore a put of what is not mounted.
            log.debug("put of %s, which nothing holds and is not mounted", layer_id)
        return {}

    def _exists(self, call: PluginCall) -> dict[str, Any]:
        try:
            return {"Exists": self.driver.exists(_layer_id(call.json()))}
        except InvalidLayerIDError:
            return {"Exists": False}

    def _status(self, call: PluginCall) -> dict[str, Any]:
        return {"Status": [[key, value] for key, value in self.driver.status()]}

    def _get_metadata(self, call: PluginCall) -> dict[str, Any]:
        return {"Metadata": self.driver.get_metadata(_layer_id(call.json()))}

    def _cleanup(self, call: PluginCall) -> dict[str, Any]:
        # dockerd is stopping: unmount, and open the store afresh on its next Init
        with self._guard:
            driver, self._driver = self._driver, None
        if driver is not None:
            driver.cleanup()
        return {}

    def _capabilities(self, call: PluginCall) -> dict[str, Any]:
        exact = bool(getattr(self.driver, "reproduces_exact_diffs", False))
        return {"Capabilities": {"ReproducesExactDiffs": exact}}

    def _diff(self, call: PluginCall) -> Any:
        request = call.json()
        return self.driver.diff(_layer_id(request), str(request.get("Parent") or ""))

    def _changes(self, call: PluginCall) -> dict[str, Any]:
        request = call.json()
        changes = self.driver.changes(_layer_id(request), str(request.get("Parent") or ""))
        return {"Changes": [{"Path": change.path, "Kind": int(change.kind)}
                            for change in changes]}

    def _apply_diff(self, call: PluginCall) -> dict[str, Any]:
        layer_id = call.query.get("id", "")
        if not layer_id:
            raise PluginError("GraphDriver.ApplyDiff needs ?id=")
        # recorded, so that Diff gives Docker back this very tar: with ReproducesExactDiffs
        # true, Docker keeps no tar-split of its own and checks Diff against the diff_id
        size = self.driver.apply_diff(layer_id, call.query.get("parent", ""), call.body,
                                      record=self.driver.reproduces_exact_diffs)
        return {"Size": size}

    def _diff_size(self, call: PluginCall) -> dict[str, Any]:
        request = call.json()
        return {"Size": self.driver.diff_size(_layer_id(request),
                                              str(request.get("Parent") or ""))}


def _layer_id(request: Mapping[str, Any]) -> str:
    layer_id = request.get("ID")
    if not isinstance(layer_id, str) or not layer_id:
        raise PluginError("the call has no ID")
    return layer_id


def serve(plugin: GraphDriverPlugin, socket_path: str, *,
          ready: Callable[[str], None] | None = None) -> None:
    """Serves plugin on socket_path until SIGTERM or SIGINT; then stops accepting calls,
    removes the socket and unmounts what the store has mounted."""
    server = PluginServer(socket_path, plugin)
    stop = threading.Event()
    previous = {number: signal.signal(number, lambda *_: stop.set())
                for number in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, name="plugin-server", daemon=True)
    thread.start()
    try:
        if ready is not None:
            ready(server.socket_path)
        while not stop.wait(0.5):
            if not thread.is_alive():
                raise PluginError("the plugin server stopped on its own")
    finally:
        server.shutdown()
        server.server_close()
        for number, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(number, handler)
        plugin.close()
