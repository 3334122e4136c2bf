"""Rootless: a real unprivileged user, in a user and mount namespace of its own (what
`unshare -rm` makes), creates, mounts, applies and diffs through fuse-overlayfs."""

from __future__ import annotations

import ctypes
import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

import aufs
from conftest import IS_ROOT
from tarbuild import archive, directory, member

USER = "aufs-rootless"
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000


def _why_not() -> str | None:
    if not IS_ROOT:
        return "creating the test user needs root"
    if shutil.which("useradd") is None:
        return "useradd is missing"
    if shutil.which("fuse-overlayfs") is None:
        return "fuse-overlayfs is not installed (apt-get install fuse-overlayfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    try:
        if Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
            return "user namespaces are disabled (user.max_user_namespaces=0)"
    except OSError:
        pass
    return None


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=str(_why_not()))


@pytest.fixture
def rootless_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture
def fuse_for_everyone() -> object:
    """Most distributions ship /dev/fuse as 0666; this machine makes it root-only."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o666)
    yield None
    os.chmod("/dev/fuse", mode)


def enter_user_namespace(user: pwd.struct_passwd) -> None:
    """In a forked child: become the user, then root of a new user and mount namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: changing uid made /proc/self root's
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {user.pw_uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {user.pw_gid} 1")


def rootless_session(root: str, layer_tar: bytes) -> str:
    """What the unprivileged user does; returns a report, or raises."""
    assert os.geteuid() == 0 and aufs.machine.in_user_namespace()
    driver = aufs.Driver(root)  # auto: kernel overlay is refused in a user namespace
    assert driver.backend == "fuse-overlayfs", driver.backend
    driver.create("base")
    driver.apply_diff("base", "", io.BytesIO(layer_tar))
    driver.create("child", "base")
    with driver.mounted("child") as merged:
        Path(merged, "etc", "added").write_text("by the rootless user\n")
        os.remove(os.path.join(merged, "etc", "motd"))
        listing = sorted(os.listdir(os.path.join(merged, "etc")))
    changes = [str(change) for change in driver.changes("child", "base")]
    with driver.diff("child", "base") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        names = sorted(m.name for m in tar)
    driver.cleanup()
    return json.dumps([listing, changes, names])


def test_unprivileged_user_creates_mounts_applies_and_diffs(
        rootless_user: pwd.struct_passwd, fuse_for_everyone: object) -> None:
    layer_tar = archive([directory("etc"), member("etc/motd", data=b"hello\n"),
                         member("etc/hostname", data=b"box\n", uid=1000, gid=1000),
                         member("dev-null", tarfile.CHRTYPE, devmajor=1, devminor=3)])
    base = tempfile.mkdtemp(prefix="aufs-rootless-")
    os.chmod(base, 0o755)
    root = os.path.join(base, "store")
    os.mkdir(root)
    os.chown(root, rootless_user.pw_uid, rootless_user.pw_gid)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the unprivileged user
        code = 0
        try:
            os.close(reader)
            enter_user_namespace(rootless_user)
            report = rootless_session(root, layer_tar)
        except BaseException as error:  # reported to the parent
            report, code = f"error: {type(error).__name__}: {error}", 1
        os.write(writer, report.encode())
        os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0, report
        listing, changes, names = json.loads(report)
        assert listing == ["added", "hostname"]
        assert changes == ["C /etc", "A /etc/added", "D /etc/motd"]
        assert names == ["etc", "etc/.wh.motd", "etc/added"]
        owner = os.stat(os.path.join(root, "diff", "child", "etc", "added"))
        assert owner.st_uid == rootless_user.pw_uid  # the user's own files, on the host
        assert not os.path.exists(os.path.join(root, "diff", "base", "dev-null"))  # no mknod
    finally:
        shutil.rmtree(base)
