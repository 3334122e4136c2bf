"""A real dockerd (Debian's docker.io, 20.10) keeps its images and containers in this store
through `aufs docker-plugin`: load, run, diff, export, commit and save, rm and rmi, daemon
and plugin restarts, six containers at once, an old Docker AUFS root served in place, and the
checks of Docker's own integration-cli external graphdriver test. What a container changes is
compared with what Docker's vfs driver gives for the same commands, recorded in the run."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemons import (
    Daemon,
    Plugin,
    dockerd_missing,
    mounts_under,
    remove_scratch,
    short_scratch,
    unique_plugin_name,
)

from conftest import FIXTURES
from dockerroot import build_docker_root, image_ids

pytestmark = pytest.mark.skipif(dockerd_missing() is not None, reason=str(dockerd_missing()))

SAMPLE = FIXTURES / "sample-docker.tar"
IMAGE = "peers/sample:latest"
NO_NETWORK = ("--network", "none")
# adds, changes, chmods and deletes files and trees, replaces a dir (and a dir by a file),
# retargets a symlink
MUTATE = r"""set -e
cd /fixture
echo added > added.txt
mkdir -p addtree/a/b
echo deep > addtree/a/b/c.txt
echo top > addtree/t.txt
echo more >> config.txt
chmod 700 modechange.sh
chmod 750 keepdir
rm new.txt
rm -rf newdir
rm -rf replacedir
mkdir replacedir
echo again > replacedir/again.txt
rm -rf opqdir/newsub
echo x > opqdir/newsub
ln -sfn hl1 link-retarget
"""


def sample_diff_ids() -> list[str]:
    with tarfile.open(SAMPLE) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(archive.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    return list(config["rootfs"]["diff_ids"])


Entry = tuple[str, str, int, int, int, int, str, str]


def listing(data: bytes) -> list[Entry]:
    """A tar's members without their times: name, type, permissions, owner, size, link
    target and a digest of the contents."""
    entries = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            content = ""
            if member.isfile():
                content = hashlib.sha256(archive.extractfile(member).read()).hexdigest()  # type: ignore[union-attr]
            entries.append((member.name.rstrip("/"), member.type.decode(), member.mode & 0o7777,
                            member.uid, member.gid, member.size, member.linkname, content))
    return sorted(entries)


def saved_layers(daemon: Daemon, image: str) -> tuple[list[str], list[bytes]]:
    """docker save: the config's diff_ids and each layer tar, bottom first."""
    saved = daemon.docker("save", image).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(archive.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
        layers = [archive.extractfile(name).read()  # type: ignore[union-attr]
                  for name in manifest[0]["Layers"]]
    return list(config["rootfs"]["diff_ids"]), layers


@dataclass
class Mutated:
    changes: list[str]  # docker diff, sorted
    export: list[Entry]  # docker export of the container
    layer: list[Entry]  # the committed layer, from docker save
    committed_export: list[Entry]  # docker export of a container of the committed image


def mutate_and_record(daemon: Daemon) -> Mutated:
    daemon.docker("run", "--name", "mutated", *NO_NETWORK, IMAGE, "sh", "-c", MUTATE)
    changes = sorted(daemon.out("diff", "mutated").splitlines())
    export = listing(daemon.docker("export", "mutated").stdout)
    daemon.docker("commit", "mutated", "peers/sample:committed")
    _, layers = saved_layers(daemon, "peers/sample:committed")
    daemon.docker("create", "--name", "fromcommit", *NO_NETWORK, "peers/sample:committed",
                  "true")
    committed_export = listing(daemon.docker("export", "fromcommit").stdout)
    return Mutated(changes, export, listing(layers[-1]), committed_export)


@dataclass
class OnPlugin:
    base: Path  # the daemon's data root
    plugin: Plugin
    daemon: Daemon

    @property
    def home(self) -> Path:
        return self.base / self.plugin.name  # the Home dockerd's Init sends

    def layers(self) -> set[str]:
        return {path.name for path in (self.home / "layers").iterdir()}

    def mounts(self) -> list[str]:
        return mounts_under(self.home)


def start_on_plugin(base: Path, *plugin_arguments: str, name: str | None = None,
                    load: bool = True) -> OnPlugin:
    plugin = Plugin(name or unique_plugin_name(), base / "plugin.log", *plugin_arguments).start()
    daemon = Daemon(base, plugin.name)
    try:
        daemon.start()
        if load:
            loaded = daemon.out("load", "-i", str(SAMPLE))
            assert f"Loaded image: {IMAGE}" in loaded
    except BaseException:
        daemon.stop()
        plugin.close()
        raise
    return OnPlugin(base, plugin, daemon)


def stop_on_plugin(setup: OnPlugin) -> None:
    try:
        setup.daemon.stop()
    finally:
        setup.plugin.close()
        remove_scratch(setup.base)


@pytest.fixture
def on_plugin() -> Iterator[OnPlugin]:
    setup = start_on_plugin(short_scratch())
    try:
        yield setup
    finally:
        stop_on_plugin(setup)


@pytest.fixture(scope="module")
def vfs_reference() -> Iterator[Mutated]:
    """The same commands on Docker's own vfs driver, in this run."""
    base = short_scratch()
    daemon = Daemon(base, "vfs")
    try:
        daemon.start()
        daemon.docker("load", "-i", str(SAMPLE))
        yield mutate_and_record(daemon)
    finally:
        daemon.stop()
        remove_scratch(base)


def test_load_and_run(on_plugin: OnPlugin) -> None:
    daemon = on_plugin.daemon
    assert f"Storage Driver: {on_plugin.plugin.name}" in daemon.out("info")
    assert len(on_plugin.layers()) == 3
    output = daemon.out("run", "--rm", *NO_NETWORK, IMAGE, "sh", "-c",
                        "echo written > /tmp/x && cat /tmp/x /fixture/config.txt "
                        "&& ls /fixture/opqdir")
    assert output.splitlines()[0] == "written"
    assert "new.txt" in output and "old1.txt" not in output  # the opaque dir of layer 3
    assert len(on_plugin.layers()) == 3  # the container's two layers went with it
    assert on_plugin.mounts() == []


def test_a_created_container_has_an_empty_diff(on_plugin: OnPlugin) -> None:
    on_plugin.daemon.docker("create", "--name", "fresh", *NO_NETWORK, IMAGE, "true")
    assert on_plugin.daemon.out("diff", "fresh") == ""


def test_changes_export_and_commit_match_vfs(on_plugin: OnPlugin,
                                             vfs_reference: Mutated) -> None:
    ours = mutate_and_record(on_plugin.daemon)
    assert "D /fixture/replacedir/fresh.txt" in vfs_reference.changes
    assert ours.changes == vfs_reference.changes
    assert ours.export == vfs_reference.export
    assert ours.committed_export == vfs_reference.committed_export
    # The layers may say "deleted" differently: vfs (a naive diff) whites out each name,
    # overlayfs makes a replaced dir opaque. Everything else is the same entry.

    def content(layer: list[Entry]) -> list[Entry]:
        return [entry for entry in layer if not entry[0].rsplit("/", 1)[-1].startswith(".wh.")]

    def hidden(layer: list[Entry]) -> tuple[set[str], set[str]]:
        names = [entry[0] for entry in layer]
        whiteouts = {name.replace(".wh.", "", 1) for name in names
                     if "/.wh." in name and not name.endswith("/.wh..wh..opq")}
        opaque = {name.removesuffix("/.wh..wh..opq") for name in names
                  if name.endswith("/.wh..wh..opq")}
        return whiteouts, opaque

    assert content(ours.layer) == content(vfs_reference.layer)
    their_whiteouts, _ = hidden(vfs_reference.layer)
    our_whiteouts, our_opaque = hidden(ours.layer)
    for name in their_whiteouts:
        assert name in our_whiteouts or name.rsplit("/", 1)[0] in our_opaque, name


def test_save_keeps_the_loaded_layers_diff_ids(on_plugin: OnPlugin) -> None:
    daemon = on_plugin.daemon
    daemon.docker("run", "--name", "changed", *NO_NETWORK, IMAGE, "sh", "-c",
                  "echo hello > /hello && rm /fixture/config.txt")
    daemon.docker("commit", "changed", "peers/sample:committed")
    diff_ids, layers = saved_layers(daemon, "peers/sample:committed")
    assert diff_ids[:3] == sample_diff_ids()
    assert len(diff_ids) == 4
    for diff_id, layer in zip(diff_ids, layers, strict=True):
        assert "sha256:" + hashlib.sha256(layer).hexdigest() == diff_id
    names = {entry[0] for entry in listing(layers[-1])}
    assert {"hello", "fixture/.wh.config.txt"} <= names


def test_rm_and_rmi_leave_no_layer_and_no_mount(on_plugin: OnPlugin) -> None:
    daemon = on_plugin.daemon
    daemon.docker("run", "-d", "--name", "running", *NO_NETWORK, IMAGE, "sleep", "600")
    daemon.docker("run", "--name", "stopped", *NO_NETWORK, IMAGE, "sh", "-c", "echo x > /x")
    daemon.docker("commit", "stopped", "peers/sample:committed")
    assert on_plugin.mounts()  # the running container's rootfs
    assert len(on_plugin.layers()) == 3 + 1 + 2 + 2
    daemon.docker("rm", "-f", "running", "stopped")
    daemon.docker("rmi", "peers/sample:committed", IMAGE)
    assert on_plugin.layers() == set()
    assert list((on_plugin.home / "diff").iterdir()) == []
    assert list((on_plugin.home / "mnt").iterdir()) == []
    assert on_plugin.mounts() == []


def test_a_daemon_restart_keeps_images_and_containers(on_plugin: OnPlugin) -> None:
    daemon = on_plugin.daemon
    daemon.docker("run", "--name", "kept", *NO_NETWORK, IMAGE, "sh", "-c",
                  "echo kept >> /kept && cat /kept")
    layers = on_plugin.layers()
    daemon.restart()
    assert on_plugin.layers() == layers
    assert IMAGE.split(":")[0] in daemon.out("images")
    assert "kept" in daemon.out("ps", "-a", "--format", "{{.Names}}").split()
    assert daemon.out("diff", "kept").splitlines() == ["A /kept"]
    # the container's layer is the same one: its file is still there and grows
    assert daemon.out("start", "-a", "kept").split() == ["kept", "kept"]
    assert daemon.out("run", "--rm", *NO_NETWORK, IMAGE, "cat", "/fixture/config.txt")


def test_six_containers_at_once(on_plugin: OnPlugin) -> None:
    daemon = on_plugin.daemon

    def start(number: int) -> None:
        daemon.docker("run", "-d", "--name", f"many{number}", *NO_NETWORK, IMAGE, "sh", "-c",
                      f"echo {number} > /mine && exec sleep 600")

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(start, range(6)))
    running = daemon.out("ps", "--format", "{{.Names}}").split()
    assert sorted(running) == [f"many{number}" for number in range(6)]
    for number in range(6):
        deadline = time.monotonic() + 60
        while daemon.docker("exec", f"many{number}", "cat", "/mine",
                            check=False).stdout.decode().strip() != str(number):
            assert time.monotonic() < deadline, f"many{number} never wrote /mine"
            time.sleep(0.1)
        assert daemon.out("diff", f"many{number}").splitlines() == ["A /mine"]
    assert len(on_plugin.mounts()) == 6
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda n: daemon.docker("rm", "-f", f"many{n}"), range(6)))
    assert on_plugin.mounts() == []
    assert len(on_plugin.layers()) == 3


def test_the_plugin_killed_and_restarted_under_a_running_daemon(on_plugin: OnPlugin) -> None:
    daemon, plugin = on_plugin.daemon, on_plugin.plugin
    image_layers = on_plugin.layers()
    daemon.docker("run", "-d", "--name", "live", *NO_NETWORK, IMAGE, "sh", "-c",
                  "echo live > /live && exec sleep 600")
    layers = on_plugin.layers()
    plugin.kill()
    assert plugin.socket.is_socket()  # what a killed plugin leaves behind
    plugin.start()  # no --root: it serves the Home of the Init it recorded
    assert on_plugin.layers() == layers
    assert daemon.out("diff", "live").splitlines() == ["A /live"]
    assert daemon.out("run", "--rm", *NO_NETWORK, IMAGE, "cat", "/fixture/config.txt")
    daemon.docker("rm", "-f", "live")
    assert on_plugin.layers() == image_layers
    assert on_plugin.mounts() == []


def test_a_docker_aufs_root_opens_in_place() -> None:
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("an AUFS-format root mounts through fuse-overlayfs, which is not installed")
    base = short_scratch()
    name = unique_plugin_name()
    build_docker_root(base)
    # Docker 24+ would look for image/aufs with `--storage-driver aufs`; 20.10 has its own
    # aufs, so the plugin takes another name and the image store follows it
    (base / "image" / "aufs").rename(base / "image" / name)
    setup = start_on_plugin(base, "--root", str(base / "aufs"), name=name, load=False)
    try:
        daemon = setup.daemon
        images = daemon.out("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}")
        listed = dict(line.split() for line in images.splitlines())
        for tag, image_id in image_ids().items():
            assert image_id.removeprefix("sha256:").startswith(listed[tag])
        assert "backend" in daemon.out("info").lower()
        output = daemon.out("run", "--rm", *NO_NETWORK, "peers/sample:latest", "sh", "-c",
                            "cat /fixture/config.txt && ls /fixture/opqdir")
        assert "new.txt" in output and "old1.txt" not in output
        before = set((base / "aufs" / "layers").iterdir())
        daemon.docker("run", "--name", "rescued", *NO_NETWORK, "peers/sample:committed",
                      "sh", "-c", "echo back > /back")
        assert daemon.out("diff", "rescued").splitlines() == ["A /back"]
        daemon.docker("rm", "rescued")
        assert set((base / "aufs" / "layers").iterdir()) == before
        assert not (base / name).exists()  # --root, not the Home dockerd sent
    finally:
        stop_on_plugin(setup)


def test_the_checks_of_dockers_external_graphdriver_test() -> None:
    """integration-cli's TestExternalGraphDriver: run, restart, inspect, diff, rm, info,
    stop; then how many times each call reached the plugin."""
    setup = start_on_plugin(short_scratch())
    try:
        daemon, plugin = setup.daemon, setup.plugin
        daemon.docker("run", "--name=graphtest", *NO_NETWORK, IMAGE, "sh", "-c",
                      "echo hello > /hello")
        daemon.restart()
        name = daemon.out("inspect", "--type", "container", "--format={{.GraphDriver.Name}}",
                          "graphtest")
        assert name.strip() == plugin.name
        assert "A /hello" in daemon.out("diff", "graphtest")
        daemon.docker("rm", "-f", "graphtest")
        daemon.out("info")
        daemon.stop()
        calls = plugin.calls()
        assert calls["Plugin.Activate"] == 2
        assert calls["GraphDriver.Init"] == 2
        assert calls["GraphDriver.Create"] + calls["GraphDriver.CreateReadWrite"] >= 1
        assert calls["GraphDriver.Remove"] >= 1
        assert calls["GraphDriver.Get"] >= 1
        assert calls["GraphDriver.Put"] >= 1
        assert calls["GraphDriver.Status"] >= 1
        assert calls["GraphDriver.Cleanup"] == 2
        assert calls["GraphDriver.ApplyDiff"] >= 1
        assert calls["GraphDriver.Changes"] == 1
        assert calls["GraphDriver.DiffSize"] == 0
        assert calls["GraphDriver.Diff"] == 0
        assert calls["GraphDriver.GetMetadata"] == 1
        assert calls["GraphDriver.Capabilities"] == 2
        assert setup.mounts() == []
    finally:
        stop_on_plugin(setup)
