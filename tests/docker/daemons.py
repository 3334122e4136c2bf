"""A private dockerd (Debian's docker.io, 20.10) and our graphdriver plugin, as processes the
daemon tests and the benchmark start and stop. Each daemon has its own data root, exec root
and API socket, no bridge and no iptables; containers run with --network none."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aufs

DOCKERD = shutil.which("dockerd")
DOCKER = shutil.which("docker")
PLUGINS_DIR = Path("/run/docker/plugins")
_names = itertools.count()


def dockerd_missing() -> str | None:
    """Why the daemon tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    if DOCKERD is None or DOCKER is None:
        return "dockerd is not installed (apt-get install docker.io; tests/system-packages does)"
    return None


def unique_plugin_name() -> str:
    # not "aufs": dockerd 20.10 has a built-in driver of that name, which wins
    return f"aufstest{os.getpid()}n{next(_names)}"


def short_scratch() -> Path:
    """A folder on tmpfs with a short path: dockerd puts unix sockets under its exec root."""
    return Path(tempfile.mkdtemp(prefix="aufs-dk-", dir="/dev/shm"))


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            target = line.split()[4].encode().decode("unicode_escape")
            if target.startswith(prefix) or target == str(path):
                found.append(target)
    return found


def remove_scratch(path: Path) -> None:
    for target in sorted(mounts_under(path), key=len, reverse=True):
        with contextlib.suppress(OSError):
            aufs.unmount(target, 2)  # MNT_DETACH
    shutil.rmtree(path, ignore_errors=True)


class Plugin:
    """`aufs docker-plugin` in a child process, with --debug so that its calls are logged."""

    def __init__(self, name: str, log_path: Path, *extra: str) -> None:
        self.name = name
        self.socket = PLUGINS_DIR / f"{name}.sock"
        self.record = PLUGINS_DIR / f"{name}.init.json"
        self.log_path = log_path
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Plugin:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aufs", "docker-plugin", "--name", self.name, "--debug",
             *self.extra], stdout=log, stderr=subprocess.STDOUT, cwd="/")
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the plugin did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; returns the exit status."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        finally:
            self.process = None

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def calls(self) -> collections.Counter[str]:
        """How many times each call reached the plugin (the --debug log's "call" lines)."""
        return collections.Counter(re.findall(r"DEBUG: call (\S+)", self.log()))

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop()
            if self.process is not None:
                self.kill()
        with contextlib.suppress(FileNotFoundError):
            self.record.unlink()


class Daemon:
    """A private dockerd; `docker(...)` runs the client against it."""

    def __init__(self, root: Path, storage_driver: str) -> None:
        self.root = root
        self.storage_driver = storage_driver
        self.host = f"unix://{root}/docker.sock"
        self.log_path = root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> Daemon:
        assert DOCKERD is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        self.process = subprocess.Popen(
            [DOCKERD, "--experimental", "--storage-driver", self.storage_driver,
             "--data-root", str(self.root), "--exec-root", str(self.root / "x"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host,
             "--bridge=none", "--iptables=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, cwd="/")
        log.close()
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def docker(self, *arguments: str, check: bool = True, input: bytes | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        assert DOCKER is not None
        result = subprocess.run([DOCKER, "-H", self.host, *arguments], input=input,
                                capture_output=True, timeout=timeout,
                                env=dict(os.environ, DOCKER_CONFIG=str(self.root / "client")))
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(arguments)} failed "
                                 f"({result.returncode}):\n{result.stderr.decode()}\n"
                                 f"dockerd log:\n{self.log()[-3000:]}")
        return result

    def out(self, *arguments: str) -> str:
        return self.docker(*arguments).stdout.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
