"""Every `aufs` command, found in the parser itself so that a new one is covered at once, fed
hostile or missing inputs: missing paths, garbage files, bad ids, a corrupt image (in an OCI
layout and behind a registry), roots that are no store. Each must fail with one clear line on
stderr and a non-zero status, and no traceback may reach stderr without --debug."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from registries import FakeRegistry

from aufs.cli import main as cli
from aufs.cli.samples import shipped_sample_path
from conftest import FIXTURES, IS_ROOT
from dockerroot import build_docker_root

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the CLI mounts layers: it needs root")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the aufs parser has no subcommands")


def inputs_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The positionals and the required options: what a caller must give."""
    return [action for action in parser._actions
            if not action.option_strings or (action.required and action.nargs != 0)]


COMMANDS = subcommands()


class Inputs:
    """The hostile values, and a good value of each kind for the other arguments."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.garbage = base / "garbage.bin"
        self.garbage.write_bytes(hashlib.sha512(b"garbage").digest() * 64)
        self.empty_dir = base / "empty-dir"
        self.empty_dir.mkdir()
        self.tar = base / "layer.tar"
        self.tar.write_bytes(b"\0" * 1024)  # an empty archive: two zero blocks
        self.corrupt = corrupt_layout(base / "corrupt-oci")
        self.truncated = corrupt_layout(base / "truncated-oci", truncate=True)
        self.device = base / "null-device"  # ours: if a command replaced it, only it is lost
        os.mknod(self.device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        self.docker_root = build_docker_root(base / "docker")
        self.registry = FakeRegistry()  # serves the corrupt layout: a blob damaged at rest
        self.registry.load_layout(self.corrupt, "latest")
        self.registry.manifests["garbage"] = (self.garbage.read_bytes(),
                                              "application/vnd.oci.image.manifest.v1+json")
        self.store = base / "store"
        imported = cli_json(self.store, "import", shipped_sample_path())
        self.tag = imported[0]["name"]
        self.layer = imported[0]["top"]

    def hostile(self, action: argparse.Action, sandbox: Path) -> list[str]:
        if action.dest == "output":  # written: only into the sandbox, or nowhere
            (sandbox / "a-dir").mkdir(exist_ok=True)
            return ["", "/nonexistent/dir/out", str(sandbox / "a-dir"), "/proc/version",
                    str(self.device), "x" * 300, "../../out"]
        return ["", "nope", "../../etc", "x" * 300, "a:b@sha256:zz",
                "/nonexistent/path", str(self.garbage), str(self.empty_dir),
                f"{self.corrupt}:latest", f"{self.truncated}:latest",
                "localhost:1/team/app:1.0", str(self.device),
                f"{self.registry.address}/team/app:latest",
                f"{self.registry.address}/team/app:garbage",
                f"{self.registry.address}/team/app:missing"]

    def good(self, action: argparse.Action) -> str:
        """A value that lets the command get past this argument."""
        if action.choices:
            return str(next(iter(action.choices)))
        good = {"source": shipped_sample_path(), "ref": self.tag, "layer": self.layer,
                "file": str(self.tar), "target": self.tag, "docker_root": str(self.docker_root),
                "reference": "localhost:1/team/app:1.0",
                "destination": "localhost:1/team/app:1.0",
                "output": str(self.base / "out" / "result"),
                "name": "aufs-hostile-test"}  # docker-plugin's, only ever with a bad root
        assert action.dest in good, (f"new argument {action.dest!r}: give it a good value "
                                     "in Inputs.good")
        return good[action.dest]


def corrupt_layout(destination: Path, truncate: bool = False) -> Path:
    """The OCI sample with one byte flipped in the middle of the base layer of tag latest (or
    that blob cut in half), digests left as they were: what a damaged disk gives."""
    shutil.copytree(FIXTURES / "oci-sample", destination)
    blobs = destination / "blobs" / "sha256"
    index = json.loads((destination / "index.json").read_text())
    latest = next(entry for entry in index["manifests"]
                  if entry["annotations"]["org.opencontainers.image.ref.name"] == "latest")
    manifest = json.loads((blobs / latest["digest"][7:]).read_text())
    blob = blobs / manifest["layers"][0]["digest"][7:]
    data = blob.read_bytes()
    assert data[:2] == b"\x1f\x8b", "the sample's layers are gzip"
    damaged = bytearray(data[:len(data) // 2] if truncate else data)
    if not truncate:
        damaged[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    return destination


def cli_json(root: Path, *arguments: str) -> list[dict[str, str]]:
    result = subprocess.run([sys.executable, "-m", "aufs", "--root", str(root), "--json",
                             *arguments], capture_output=True, text=True, check=True)
    return list(json.loads(result.stdout))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inputs]:
    made = Inputs(tmp_path_factory.mktemp("hostile"))
    yield made
    made.registry.close()


def fresh_store(inputs: Inputs, into: Path) -> Path:
    subprocess.run(["cp", "-a", str(inputs.store), str(into)], check=True)
    return into


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr); an exception that leaves main() is a traceback."""
    try:
        status = cli.main(argv)
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    except Exception:  # whatever leaves main() would be a traceback
        pytest.fail(f"aufs {' '.join(argv)} let an exception out:\n{traceback.format_exc()}")
    return status, capsys.readouterr().err


def assert_one_clear_line(argv: list[str], status: int, stderr: str) -> None:
    shown = f"aufs {' '.join(argv)} -> {status}: {stderr!r}"
    assert "Traceback" not in stderr, shown
    assert status != 0, shown
    lines = stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("aufs") and ": error: " in lines[0], shown
    assert "internal error" not in lines[0], shown  # an exception main() did not expect


# Where a hostile-looking value is fine: du sizes any path, apply makes a layer of any valid
# id (and an empty stream is an empty tar), a diff goes into a device or any new file name.
ANY = "any"
SUCCEEDS: dict[tuple[str, str], set[str] | str] = {
    ("du", "target"): ANY, ("apply", "layer"): {"nope"}, ("apply", "file"): {"null-device"},
    ("diff", "output"): {"null-device", "x" * 300, "../../out"},
    ("export", "output"): {"x" * 300, "../../out"}, ("rescue", "output"): {"../../out"}}


# Where a hostile-looking value is valid for a server, which would then run until stopped
# (tests/docker covers serving).
SERVES = {("docker-plugin", "name"): {"nope"}}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_hostile_arguments_give_one_line(name: str, inputs: Inputs, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd" / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # relative outputs land in tmp_path, even ../../out
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker/config.json of this machine
    wanted = inputs_of(COMMANDS[name])
    for index, action in enumerate(wanted):
        if action.choices:
            continue  # argparse refuses what is not a choice, with its usage
        for value in inputs.hostile(action, tmp_path):
            if value in SERVES.get((name, action.dest), set()):
                continue  # a valid value: the command would serve until stopped
            root = fresh_store(inputs, tmp_path / f"store-{index}-{len(os.listdir(tmp_path))}")
            argv = ["--root", str(root), name]
            for other in wanted:
                given = value if other is action else inputs.good(other)
                argv += [other.option_strings[0], given] if other.option_strings else [given]
            status, stderr = run_in_process(argv, capsys)
            assert "Traceback" not in stderr
            assert stat.S_ISCHR(os.lstat(inputs.device).st_mode), f"aufs {argv} replaced it"
            allowed = SUCCEEDS.get((name, action.dest), set())
            if status == 0 and (allowed == ANY or value in allowed
                                or os.path.basename(value) in allowed):
                print(f"succeeds, rightly: aufs {' '.join(argv)}", file=sys.__stdout__)
                continue
            assert_one_clear_line(argv, status, stderr)


# Commands that never open the store at --root.
STORELESS = {"info", "demo", "rescue"}


def broken_roots(inputs: Inputs, base: Path) -> dict[str, Path]:
    marker = fresh_store(inputs, base / "bad-marker")
    (marker / "whiteout-format").write_text("garbage\n")
    index = fresh_store(inputs, base / "bad-index")
    (index / "images" / "index.json").write_text("[1, 2")
    shapes = fresh_store(inputs, base / "bad-index-shape")
    (shapes / "images" / "index.json").write_text('{"tags": {"x": 1}}')
    layers = base / "layers-is-a-file"
    layers.mkdir()
    (layers / "layers").write_bytes(b"garbage")
    return {"a garbage file": inputs.garbage, "a bad format marker": marker,
            "a corrupt tag index": index, "a tag index of the wrong shape": shapes,
            "layers/ is a file": layers}


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - STORELESS))
def test_a_root_that_is_no_store_gives_one_line(name: str, inputs: Inputs, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for why, root in broken_roots(inputs, tmp_path).items():
        if why in TAGLESS.get(name, ()) and (name, "name") in SERVES:
            continue  # a store it rightly accepts: it would serve until stopped
        argv = ["--root", str(root), name]
        for action in inputs_of(COMMANDS[name]):
            value = inputs.good(action)
            argv += [action.option_strings[0], value] if action.option_strings else [value]
        status, stderr = run_in_process(argv, capsys)
        if status == 0 and why in TAGLESS.get(name, ()):
            continue
        if name == "fsck" and status == 1 and not stderr:
            continue  # it found the problem and listed it on stdout, as it should
        assert_one_clear_line([why, *argv], status, stderr)


# Commands that rightly work on a store whose tag index is damaged: they never read tags.
TAGLESS = {"migrate": {"a corrupt tag index", "a tag index of the wrong shape"},
           "apply": {"a corrupt tag index", "a tag index of the wrong shape"},
           "docker-plugin": {"a corrupt tag index", "a tag index of the wrong shape"}}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_traceback_reaches_stderr(name: str, inputs: Inputs, tmp_path: Path) -> None:
    """The real command, in its own process: a missing root file for every command."""
    argv = [sys.executable, "-m", "aufs", "--root", str(inputs.garbage), name]
    for action in inputs_of(COMMANDS[name]):
        value = "/nonexistent/path" if action.dest != "output" else str(tmp_path / "out")
        value = inputs.good(action) if action.choices else value
        argv += [action.option_strings[0], value] if action.option_strings else [value]
    if name in STORELESS - {"rescue"}:
        return  # nothing hostile to give them: info and demo take no input
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, HOME=str(tmp_path)))
    assert_one_clear_line(argv[3:], result.returncode, result.stderr)
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, cwd=tmp_path,
                           env=dict(os.environ, HOME=str(tmp_path)))
    assert debug.returncode != 0
