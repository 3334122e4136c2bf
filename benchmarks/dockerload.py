"""`docker load` through our graphdriver plugin, against the same dockerd on its own overlay2
(vfs where overlay2 cannot run), both data roots on tmpfs, timed in one run.

Images: the fixture tests/fixtures/sample-docker.tar (3 small layers), and the debootstrap
root of benchmarks/layers.py as the 3-layer OCI image of benchmarks/imports.py, turned into a
docker-archive by skopeo (skipped, saying so, without umoci or skopeo)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import report, tmpfs_scratch
from benchmarks.imports import build_image
from benchmarks.layers import CACHE, root_filesystem

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "sample-docker.tar"
PLUGIN_NAME = f"aufsbench{os.getpid()}"


class Daemon:
    def __init__(self, root: Path, storage_driver: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.host = f"unix://{root}/docker.sock"
        log = open(root / "dockerd.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(
            ["dockerd", "--experimental", "--storage-driver", storage_driver, "--data-root",
             str(root), "--exec-root", str(root / "x"), "--pidfile", str(root / "pid"),
             "-H", self.host, "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 120
        while self.docker("version", check=False).returncode:
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd --storage-driver {storage_driver} did not start:"
                                   f"\n{tail}")
            time.sleep(0.2)

    def docker(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["docker", "-H", self.host, *arguments], capture_output=True,
                              check=check)

    def driver(self) -> str:
        return self.docker("info", "--format", "{{.Driver}}").stdout.decode().strip()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


def start_plugin(log_path: Path) -> subprocess.Popen[bytes]:
    socket_path = f"/run/docker/plugins/{PLUGIN_NAME}.sock"
    log = open(log_path, "ab")  # noqa: SIM115 (the child keeps it)
    plugin = subprocess.Popen([sys.executable, "-m", "aufs", "docker-plugin", "--name",
                               PLUGIN_NAME], stdout=log, stderr=subprocess.STDOUT, cwd="/")
    log.close()
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(socket_path)
            return plugin
        except OSError:
            if plugin.poll() is not None:
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.05)
        finally:
            probe.close()


def debian_archive(scratch: Path) -> tuple[Path | None, str]:
    if shutil.which("umoci") is None or shutil.which("skopeo") is None:
        return None, "the Debian image needs umoci and skopeo (apt-get install umoci skopeo)"
    source, origin = root_filesystem(scratch)
    layout = CACHE / "oci-bench"
    if not (layout / "index.json").exists():
        shutil.rmtree(layout, ignore_errors=True)
        build_image(source, layout)
    archive = scratch / "debian-docker.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}:bench",
                    f"docker-archive:{archive}:bench/debian:latest"], check=True)
    return archive, origin


def time_loads(daemon: Daemon, archive: Path, repeat: int) -> list[float]:
    times = []
    for round_number in range(repeat + 1):  # the first round warms the caches
        start = time.perf_counter()
        daemon.docker("load", "-i", str(archive))
        elapsed = time.perf_counter() - start
        if round_number:
            times.append(elapsed)
        images = daemon.docker("images", "-q").stdout.decode().split()
        daemon.docker("rmi", "-f", *images)
    return times


def main(arguments: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise SystemExit("needs root and dockerd (apt-get install docker.io)")
    repeat = int(arguments[0]) if arguments else 5
    with tmpfs_scratch("8g") as scratch:
        archives = [(FIXTURE, "the fixture image (sample-docker.tar)")]
        debian, origin = debian_archive(scratch)
        if debian is None:
            print(origin)
        else:
            archives.append((debian, f"the Debian image ({origin})"))
        plugin = start_plugin(scratch / "plugin.log")
        daemons: list[Daemon] = []
        try:
            try:
                peer = Daemon(scratch / "o", "overlay2")
                daemons.append(peer)
            except RuntimeError as error:
                print(f"overlay2 cannot run here, vfs is the peer: {str(error)[-300:]}")
                peer = Daemon(scratch / "v", "vfs")
                daemons.append(peer)
            ours = Daemon(scratch / "p", PLUGIN_NAME)
            daemons.append(ours)
            for archive, title in archives:
                size = archive.stat().st_size
                peer_times, our_times = [], []
                for _ in range(repeat):  # alternate, so that both see the same machine
                    peer_times += time_loads(peer, archive, 1)
                    our_times += time_loads(ours, archive, 1)
                peer_median = statistics.median(peer_times)
                rows = [(f"dockerd {peer.driver()} (peer)", peer_median, ""),
                        ("dockerd on aufs docker-plugin", statistics.median(our_times),
                         "goal <= 1.0")]
                report(f"docker load of {title}, {size / 1e6:.1f} MB, median of {repeat}",
                       rows, peer_median)
        finally:
            for daemon in daemons:
                daemon.stop()
            plugin.send_signal(signal.SIGTERM)
            plugin.wait(120)
            with_record = Path(f"/run/docker/plugins/{PLUGIN_NAME}.init.json")
            with_record.unlink(missing_ok=True)
