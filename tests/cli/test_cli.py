"""The `aufs` command, end to end: subprocesses against a real root, real mounts, and umoci
and skopeo reading what it exports."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import aufs
import aufs.cli.main
import aufs.store.layout
from aufs.cli.samples import build_sample_image, shipped_sample_path
from conftest import FIXTURES, IS_ROOT, backend_unavailable
from dockerroot import build_docker_root, image_ids
from tarbuild import tree_snapshot

OCI = FIXTURES / "oci-sample"

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="the CLI tests mount layers: they need root"),
]
needs_tools = pytest.mark.skipif(
    not (shutil.which("umoci") and shutil.which("skopeo")),
    reason="umoci and skopeo are not installed (apt-get install umoci skopeo)")


def run(root: Path, *arguments: str, check: bool = True, backend: str = "auto"
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "aufs", "--root", str(root), "--backend", backend, *arguments],
        capture_output=True, text=True, cwd="/",
        env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if check and result.returncode != 0:
        raise AssertionError(f"aufs {' '.join(arguments)} failed ({result.returncode}):\n"
                             f"{result.stderr}")
    return result


def comparable(root: Path) -> dict[str, tuple[object, ...]]:
    return {name: entry[:5] + entry[6:] for name, entry in tree_snapshot(root).items()}


def umoci_tree(layout: Path, ref: str, destination: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(destination)],
                   check=True, capture_output=True)
    return destination / "rootfs"


# ---- behaviour of the command itself ----------------------------------------------------------


def test_every_command_has_help_with_an_example(tmp_path: Path) -> None:
    for name, *_ in aufs.cli.main.COMMANDS:
        result = run(tmp_path, name, "--help")
        assert "example: aufs" in result.stdout, name


def test_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    result = run(tmp_path / "root", "rm", "nope", check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("aufs: error: layer 'nope' does not exist")
    assert "Traceback" not in result.stderr
    debug = run(tmp_path / "root", "rm", "nope", "--debug", check=False)
    assert "Traceback" in debug.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run(tmp_path, "frobnicate", check=False).returncode == 2
    assert run(tmp_path, "export", "x", check=False).returncode == 2  # -o is required


def test_info_reports_backends_and_implementation(tmp_path: Path) -> None:
    info = json.loads(run(tmp_path, "info", "--json").stdout)
    assert info["implementation"] == aufs.IMPLEMENTATION
    names = {backend["name"]: backend for backend in info["backends"]}
    assert set(names) == {"aufs", "overlay", "fuse-overlayfs"}
    if not names["aufs"]["usable"]:
        assert "AUFS was not found" in names["aufs"]["why"]
    assert any(report["name"] == "new mount API" for report in info["machine"])


@pytest.mark.parametrize("inflater", ["zlib", "isal"])
def test_info_says_which_gzip_inflater_runs(tmp_path: Path, inflater: str) -> None:
    if inflater == "isal" and importlib.util.find_spec("isal") is None:
        pytest.skip("isal is not installed (pip install 'aufs[fast]')")
    result = subprocess.run([sys.executable, "-m", "aufs", "--root", str(tmp_path), "info"],
                            capture_output=True, text=True, check=True,
                            env=dict(os.environ, AUFS_INFLATER=inflater))
    assert f"gzip inflater: {inflater} " in result.stdout


# ---- the layer commands -------------------------------------------------------------------------


def test_import_ls_mount_changes_diff_apply_du_rm(tmp_path: Path) -> None:
    root = tmp_path / "root"
    imported = json.loads(run(root, "import", str(OCI), "--json").stdout)
    assert {image["name"] for image in imported} == {"base", "v2", "latest", "insert"}
    layers = {layer["id"]: layer for layer in json.loads(run(root, "ls", "--json").stdout)}
    assert len(layers) == 5  # four tags sharing base and v2
    tops = {tag: image["top"] for image in imported for tag in [image["name"]]}
    assert layers[tops["latest"]]["tags"] == ["latest"]
    assert layers[tops["latest"]]["parent"] == tops["v2"]

    path = run(root, "mount", "latest").stdout.strip()
    assert aufs.is_mountpoint(path)
    assert (Path(path) / "fixture" / "opqdir" / "new.txt").exists()
    assert json.loads(run(root, "ls", "--json").stdout)[0] is not None
    run(root, "umount", "latest")
    assert not aufs.is_mountpoint(path)

    changes = run(root, "changes", "latest", "--parent", "v2").stdout.splitlines()
    assert "D /fixture/wh-by-insert.txt" in changes
    assert "A /fixture/opqdir/new.txt" in changes

    layer_tar = tmp_path / "latest.tar"
    run(root, "diff", "latest", "--parent", "v2", "-o", str(layer_tar))
    with tarfile.open(layer_tar) as tar:
        assert "fixture/opqdir/.wh..wh..opq" in tar.getnames()
    size = json.loads(run(root, "apply", "copy", "--parent", "v2", str(layer_tar),
                          "--json").stdout)["size"]
    assert size == json.loads(run(root, "du", "copy", "--json").stdout)["size"]
    assert run(root, "changes", "copy", "--parent", "v2").stdout.splitlines() == changes
    assert json.loads(run(root, "du", str(OCI), "--json").stdout)["size"] == \
        aufs.directory_size(OCI)

    removed = run(root, "rm", "insert").stdout.splitlines()
    assert len(removed) == 2  # insert's own two layers; base and v2 stay for the others
    run(root, "rm", "copy")
    assert len(json.loads(run(root, "ls", "--json").stdout)) == 3


def test_import_docker_archive_and_oci_tar(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", str(FIXTURES / "sample-docker.tar"), "--tag", "from-docker")
    oci_tar = tmp_path / "oci.tar"
    with tarfile.open(oci_tar, "w") as tar:
        for entry in sorted(OCI.iterdir()):
            tar.add(entry, entry.name)
    run(root, "import", f"{oci_tar}:latest", "--tag", "from-oci-tar")
    tags = {layer["id"]: layer["tags"] for layer in json.loads(run(root, "ls", "--json").stdout)}
    assert ["from-docker", "from-oci-tar"] in tags.values()  # same chain id: one layer


def copy_layout(destination: Path) -> Path:
    shutil.copytree(OCI, destination)
    return destination


def rewrite_blob(layout: Path, old_digest: str, new_blob: bytes, media_type: str) -> None:
    """Replaces a layer blob of tag `latest` and fixes the manifest and index."""
    new_digest = "sha256:" + hashlib.sha256(new_blob).hexdigest()
    blobs = layout / "blobs" / "sha256"
    (blobs / new_digest[7:]).write_bytes(new_blob)
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        manifest_path = blobs / entry["digest"][7:]
        manifest = json.loads(manifest_path.read_text())
        for layer in manifest["layers"]:
            if layer["digest"] == old_digest:
                layer.update(digest=new_digest, size=len(new_blob), mediaType=media_type)
        data = json.dumps(manifest).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        entry.update(digest=f"sha256:{digest}", size=len(data))
    (layout / "index.json").write_text(json.dumps(index))


def test_import_zstd_layers(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard", reason="the zstd extra is not installed")
    layout = copy_layout(tmp_path / "layout")
    manifest = json.loads((layout / "blobs" / "sha256" / json.loads(
        (layout / "index.json").read_text())["manifests"][2]["digest"][7:]).read_text())
    for layer in manifest["layers"]:
        raw = gzip.decompress((layout / "blobs" / "sha256" / layer["digest"][7:]).read_bytes())
        rewrite_blob(layout, layer["digest"], zstandard.ZstdCompressor().compress(raw),
                     "application/vnd.oci.image.layer.v1.tar+zstd")
    root = tmp_path / "root"
    run(root, "import", f"{layout}:latest")
    path = run(root, "mount", "latest").stdout.strip()
    assert (Path(path) / "fixture" / "opqdir" / "new.txt").is_file()
    run(root, "umount", "latest")


def test_a_digest_mismatch_stores_nothing(tmp_path: Path) -> None:
    layout = copy_layout(tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][2]["digest"][7:]
                           ).read_text())
    last = layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"][7:]
    data = bytearray(last.read_bytes())
    data[-20] ^= 0xFF  # inside the gzip trailer: decompression or the digest must notice
    last.write_bytes(bytes(data))
    root = tmp_path / "root"
    result = run(root, "import", f"{layout}:latest", check=False)
    assert result.returncode == 1
    assert "aufs: error:" in result.stderr
    assert json.loads(run(root, "ls", "--json").stdout) == []


def test_progress_is_silent_when_piped(tmp_path: Path) -> None:
    result = run(tmp_path / "root", "import", shipped_sample_path())
    assert "\r" not in result.stderr and "layers," not in result.stderr


# ---- export, checked by umoci and skopeo --------------------------------------------------------


@needs_tools
def test_export_oci_is_read_by_skopeo_and_umoci(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", f"{OCI}:latest")
    out = tmp_path / "exported"
    run(root, "export", "latest", "-o", str(out))
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out}:latest"],
                                        check=True, capture_output=True, text=True).stdout)
    assert len(inspect["Layers"]) == 3
    ours = umoci_tree(out, "latest", tmp_path / "ours")
    theirs = umoci_tree(copy_layout(tmp_path / "layout"), "latest", tmp_path / "theirs")
    assert comparable(ours) == comparable(theirs)


@needs_tools
def test_export_docker_archive_is_read_by_skopeo(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", f"{OCI}:v2")
    archive = tmp_path / "v2.tar"
    run(root, "export", "v2", "-o", str(archive), "--format", "docker-archive")
    copied = tmp_path / "copied"
    subprocess.run(["skopeo", "copy", f"docker-archive:{archive}", f"oci:{copied}:v2"],
                   check=True, capture_output=True)
    ours = umoci_tree(copied, "v2", tmp_path / "ours")
    theirs = umoci_tree(copy_layout(tmp_path / "layout"), "v2", tmp_path / "theirs")
    assert comparable(ours) == comparable(theirs)


# ---- migrate, rescue, demo -----------------------------------------------------------------------


@pytest.mark.skipif(bool(backend_unavailable("fuse-overlayfs")),
                    reason=str(backend_unavailable("fuse-overlayfs")))
def test_migrate_to_overlay_keeps_the_merged_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", str(OCI), backend="fuse-overlayfs")
    before = {}
    for tag in ("latest", "insert"):
        path = run(root, "mount", tag, backend="fuse-overlayfs").stdout.strip()
        before[tag] = comparable(Path(path))
        run(root, "umount", tag, backend="fuse-overlayfs")
    assert "5 layers converted to overlay" in run(root, "migrate", "--to", "overlay").stdout
    assert (root / "whiteout-format").read_text() == "overlay\n"
    for tag in ("latest", "insert"):
        path = run(root, "mount", tag).stdout.strip()  # auto now picks kernel overlay
        assert comparable(Path(path)) == before[tag], tag
        run(root, "umount", tag)


def test_an_interrupted_migration_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    from aufs.store import migrate as migration

    root = tmp_path / "root"
    run(root, "import", f"{OCI}:latest", backend="fuse-overlayfs")
    calls = []

    def crash_after_one(branch: str) -> None:
        if calls:
            raise KeyboardInterrupt("interrupted")
        calls.append(branch)
        original(branch)

    original = migration.to_overlay
    monkeypatch.setattr(migration, "to_overlay", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        migration.migrate(aufs.store.layout.Store(str(root)), "overlay")
    monkeypatch.undo()
    refused = run(root, "ls", check=False)
    assert refused.returncode == 1 and "migration to overlay" in refused.stderr
    result = migration.migrate(aufs.store.layout.Store(str(root)), "overlay")
    assert len(result.already_done) == 1 and len(result.converted) == 2
    assert run(root, "ls").returncode == 0


@needs_tools
def test_rescue_keeps_dockers_digests(tmp_path: Path) -> None:
    docker_root = build_docker_root(tmp_path / "docker")
    out = tmp_path / "rescued"
    result = run(tmp_path / "unused", "rescue", str(docker_root), "-o", str(out), "--json")
    rescued = {image["tag"]: image for image in json.loads(result.stdout)}
    assert {tag: image["image_id"] for tag, image in rescued.items()} == image_ids()
    assert all(image["exact"] for image in rescued.values())
    for tag in ("latest", "insert", "committed"):
        inspect = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{out}:{tag}"],
                                            check=True, capture_output=True, text=True).stdout)
        assert inspect["rootfs"]["diff_ids"] == rescued[f"peers/sample:{tag}"]["diff_ids"]
    ours = umoci_tree(out, "latest", tmp_path / "ours")
    theirs = umoci_tree(copy_layout(tmp_path / "layout"), "latest", tmp_path / "theirs")
    assert comparable(ours) == comparable(theirs)


def test_rescue_falls_back_and_says_so(tmp_path: Path) -> None:
    docker_root = build_docker_root(tmp_path / "docker")
    layerdb = docker_root / "image" / "aufs" / "layerdb" / "sha256"
    commit_chain = "782681e97896f457c448ba337ed10820b121f46830a6c9013992f4f14dfb6507"
    (layerdb / commit_chain / "tar-split.json.gz").unlink()
    result = run(tmp_path / "unused", "rescue", str(docker_root), "-o",
                 str(tmp_path / "out"), "--json")
    rescued = {image["tag"]: image for image in json.loads(result.stdout)}
    committed = rescued["peers/sample:committed"]
    assert not committed["exact"]
    assert "missing data" in committed["notes"][0]
    assert committed["image_id"] != image_ids()["peers/sample:committed"]
    assert rescued["peers/sample:latest"]["exact"]


def test_demo_runs_every_step(tmp_path: Path) -> None:
    result = run(tmp_path, "demo")
    for step in ("1. imported", "2. mounted", "3. wrote", "4. exported", "5. cleaned up"):
        assert step in result.stdout
    assert "D /app/new.txt" in result.stdout
    assert "app/.wh.new.txt" in result.stdout


def test_the_shipped_sample_is_what_the_code_makes() -> None:
    assert Path(shipped_sample_path()).read_bytes() == build_sample_image()


def test_fsck_reports_then_repairs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    run(root, "import", shipped_sample_path())
    assert run(root, "fsck").stdout.strip().endswith(": clean")
    (root / "diff" / "leftover-removing").mkdir()
    (root / "mnt" / "orphan").mkdir()
    found = run(root, "fsck", "--json", check=False)
    assert found.returncode == 1
    codes = sorted(p["code"] for p in json.loads(found.stdout)["problems"])
    assert codes == ["orphan-dir", "stale-removing"]
    repaired = run(root, "fsck", "--repair")
    assert "repaired stale-removing" in repaired.stdout
    assert run(root, "fsck").returncode == 0


def test_sizes_are_human_and_json_keeps_bytes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with aufs.Driver(root) as driver:
        driver.create("big")
        driver.create("small", "big")
    with open(root / "diff" / "big" / "sparse", "wb") as sparse:
        sparse.truncate(198900834)  # apparent bytes: a size `docker images` shows as 198.9MB
    (root / "diff" / "small" / "file").write_bytes(b"x" * 1024)
    listing = run(root, "ls").stdout.splitlines()
    assert listing[0].split() == ["big", "198.9MB"]
    assert listing[1].split() == ["small", "1.024kB"]
    sizes = {layer["id"]: layer["size"] for layer in json.loads(run(root, "ls", "--json").stdout)}
    assert sizes == {"big": 198900834, "small": 1024}
    assert run(root, "du", str(root / "diff" / "big")).stdout == "198.9MB\n"
    assert json.loads(run(root, "du", "big", "--json").stdout)["size"] == 198900834


def test_fsck_repair_force_removes_a_broken_chain_and_its_tags(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tops = {image["name"]: image["top"]
            for image in json.loads(run(root, "import", str(OCI), "--json").stdout)}
    layers = {layer["id"]: layer for layer in json.loads(run(root, "ls", "--json").stdout)}
    insert_parent = layers[tops["insert"]]["parent"]
    mounted = run(root, "mount", "insert").stdout.strip()  # insert builds on v2 too
    try:
        shutil.rmtree(root / "diff" / tops["v2"])  # latest and insert build on it

        kept = run(root, "fsck", "--repair", check=False)
        assert kept.returncode == 1 and "removed" not in kept.stdout
        assert "--force" in kept.stdout
        listed = {layer["id"]: layer for layer in json.loads(run(root, "ls", "--json").stdout)}
        assert len(listed) == 5
        assert listed[tops["v2"]]["size"] is None
        assert listed[tops["v2"]]["broken"] == "content missing"
        assert "- broken (content missing; see aufs fsck) [v2]" in run(root, "ls").stdout
        assert run(root, "fsck", "--force", check=False).returncode == 2  # it needs --repair

        first = run(root, "fsck", "--repair", "--force", check=False)
        assert first.returncode == 1  # insert is mounted: it and what it builds on stay
        assert first.stdout.splitlines()[:2] == [
            f"removed layer {tops['latest']} (built on broken layer {tops['v2']})",
            f"removed tag latest (tag 'latest' names missing layer {tops['latest'][:12]})"]
        in_use = [line for line in first.stdout.splitlines() if "broken-layer-in-use" in line]
        assert len(in_use) == 3 and f"{tops['insert']}: mounted" in "".join(in_use)
        assert aufs.is_mountpoint(mounted)

        run(root, "umount", "insert")
        second = json.loads(run(root, "fsck", "--repair", "--force", "--json").stdout)
        assert second["removed_layers"] == [tops["insert"], insert_parent, tops["v2"]]
        assert sorted(second["removed_tags"]) == ["insert", "v2"]
        assert second["problems"] == []
        assert run(root, "fsck").stdout.strip().endswith(": clean")
    finally:
        if os.path.exists(mounted) and aufs.is_mountpoint(mounted):  # never leave it mounted
            aufs.unmount(mounted, 2)
    left = json.loads(run(root, "ls", "--json").stdout)
    assert [(layer["id"], layer["tags"]) for layer in left] == [(tops["base"], ["base"])]
