"""Pull and push against a real registry (Distribution 2.8, Debian's docker-registry) on
127.0.0.1, with anonymous, basic and token auth; and a fake registry for the faults."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from registries import FakeRegistry, TokenService, htpasswd, real_registry

import aufs
import aufs.images.fsck
from aufs.images import Catalog, import_images
from aufs.images.digests import DigestMismatchError
from aufs.images.pull import pull
from aufs.images.push import push
from aufs.images.registry import (
    Credentials,
    Reference,
    RegistryAuthError,
    RegistryClient,
    RegistryError,
    RegistryNotFoundError,
)
from conftest import FIXTURES, IS_ROOT, Harness
from tarbuild import tree_snapshot

OCI = FIXTURES / "oci-sample"

pytestmark = [
    pytest.mark.skipif(not IS_ROOT, reason="pulled layers are mounted: that needs root"),
    pytest.mark.skipif(shutil.which("docker-registry") is None,
                       reason="docker-registry is not installed (apt-get install docker-registry)"),
]


def comparable(root: Path) -> dict[str, tuple[object, ...]]:
    return {name: entry[:5] + entry[6:] for name, entry in tree_snapshot(root).items()}


@pytest.fixture
def source(scratch: Path) -> tuple[aufs.Driver, Catalog]:
    driver = Harness("overlay").driver(scratch / "source")
    catalog = Catalog(driver.store)
    import_images(driver, catalog, str(OCI))
    return driver, catalog


def merged(driver: aufs.Driver, layer: str) -> dict[str, tuple[object, ...]]:
    with driver.mounted(layer) as path:
        return comparable(Path(path))


def test_reference_parsing() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/app:1.2")
    assert (ref.registry, ref.repository, ref.tag, ref.name) == ("127.0.0.1:5000", "team/app",
                                                                 "1.2", "1.2")
    digest = "sha256:" + "a" * 64
    assert Reference.parse(f"localhost/app@{digest}").name == digest
    for bad in ("app:1", "example.com/UPPER:1", "example.com/app@sha256:xyz"):
        with pytest.raises(ValueError):
            Reference.parse(bad)
    assert RegistryClient(Reference.parse("registry.example.com/a:1")).scheme == "https"
    assert RegistryClient(Reference.parse("localhost:5000/a:1")).scheme == "http"
    assert RegistryClient(Reference.parse("registry.example.com/a:1"), insecure=True
                          ).scheme == "http"


def test_push_is_read_by_skopeo_and_umoci(source: tuple[aufs.Driver, Catalog],
                                          tmp_path: Path) -> None:
    if not (shutil.which("skopeo") and shutil.which("umoci")):
        pytest.skip("skopeo and umoci are not installed (apt-get install skopeo umoci)")
    driver, catalog = source
    with real_registry(tmp_path / "registry") as registry:
        result = push(driver, catalog, "latest", f"{registry}/peers/sample:latest")
        assert len(result.uploaded) == 4 and not result.skipped
        again = push(driver, catalog, "latest", f"{registry}/peers/sample:latest")
        assert len(again.skipped) == 4 and not again.uploaded  # HEAD: already there
        other = push(driver, catalog, "v2", f"{registry}/others/sample:v2",
                     compression="zstd", chunk_size=100_000)
        assert len(other.uploaded) == 3  # zstd layers and a new config
        mounted = push(driver, catalog, "v2", f"{registry}/third/sample:v2")
        # both gzip layers come from peers/sample, the config (same diff_ids) from others/sample
        assert len(mounted.mounted) == 3 and not mounted.uploaded
        inspect = json.loads(subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/peers/sample:latest"],
            check=True, capture_output=True, text=True).stdout)
        assert inspect["Digest"] == result.manifest_digest
        layout = tmp_path / "copied"
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                        f"docker://{registry}/peers/sample:latest", f"oci:{layout}:latest"],
                       check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    assert comparable(tmp_path / "bundle" / "rootfs") == merged(driver,
                                                                  catalog.resolve("latest")[0])


def test_pull_matches_the_source_and_skips_what_it_has(source: tuple[aufs.Driver, Catalog],
                                                       scratch: Path, tmp_path: Path) -> None:
    driver, catalog = source
    target = Harness("overlay").driver(scratch / "target")
    target_catalog = Catalog(target.store)
    with real_registry(tmp_path / "registry") as registry:
        pushed = push(driver, catalog, "insert", f"{registry}/peers/sample:insert")
        push(driver, catalog, "v2", f"{registry}/peers/sample:v2")
        first = pull(target, target_catalog, f"{registry}/peers/sample:v2")
        assert len(first.created) == 2
        image = pull(target, target_catalog, f"{registry}/peers/sample@{pushed.manifest_digest}",
                     tag="insert")
        assert len(image.created) == 2  # the base and v2 layers were already there
        again = pull(target, target_catalog, f"{registry}/peers/sample:insert")
        assert again.created == ()
    assert merged(target, image.top) == merged(driver, catalog.resolve("insert")[0])
    assert target_catalog.tags()["insert"].top == image.top


def test_pull_picks_the_platform_from_an_index(source: tuple[aufs.Driver, Catalog],
                                               scratch: Path, tmp_path: Path) -> None:
    driver, catalog = source
    with real_registry(tmp_path / "registry") as registry:
        pushed = push(driver, catalog, "v2", f"{registry}/multi/sample:amd64-only")
        manifest_size = len(RegistryClient(Reference.parse(f"{registry}/multi/sample:x"))
                            .get_manifest(pushed.manifest_digest)[0])
        entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": pushed.manifest_digest, "size": manifest_size,
                 "platform": {"os": "linux", "architecture": "amd64"}}
        index = json.dumps({"schemaVersion": 2,
                            "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": [entry]})
        client = RegistryClient(Reference.parse(f"{registry}/multi/sample:multi"))
        client.put_manifest("multi", index.encode(), "application/vnd.oci.image.index.v1+json")
        target = Harness("overlay").driver(scratch / "target")
        image = pull(target, Catalog(target.store), f"{registry}/multi/sample:multi",
                     platform="linux/amd64")
        assert len(image.layers) == 2
        with pytest.raises(aufs.images.ImageSourceError, match="linux/amd64"):
            pull(target, Catalog(target.store), f"{registry}/multi/sample:multi",
                 platform="linux/arm64")


def test_basic_auth_from_flags_and_docker_config(source: tuple[aufs.Driver, Catalog],
                                                 scratch: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    driver, catalog = source
    htpasswd(tmp_path / "htpasswd", "alice", "s3cret")
    auth = {"htpasswd": {"realm": "aufs-test", "path": str(tmp_path / "htpasswd")}}
    with real_registry(tmp_path / "registry", auth) as registry:
        with pytest.raises(RegistryAuthError, match="401"):
            push(driver, catalog, "base", f"{registry}/private/base:1")
        with pytest.raises(RegistryAuthError):
            push(driver, catalog, "base", f"{registry}/private/base:1",
                 credentials=Credentials("alice", "wrong"))
        push(driver, catalog, "base", f"{registry}/private/base:1",
             credentials=Credentials("alice", "s3cret"))
        config_dir = tmp_path / "docker"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(json.dumps({"auths": {registry: {
            "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
        root = scratch / "cli"
        result = subprocess.run([sys.executable, "-m", "aufs", "--root", str(root), "pull",
                                 f"{registry}/private/base:1", "--json"], capture_output=True,
                                text=True, cwd="/")
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["layers"]) == 1
        monkeypatch.delenv("DOCKER_CONFIG")
        refused = subprocess.run([sys.executable, "-m", "aufs", "--root", str(root), "pull",
                                  f"{registry}/private/base:1"], capture_output=True, text=True,
                                 cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert refused.returncode == 1
        assert "refused the credentials" in refused.stderr


def test_bearer_token_flow(source: tuple[aufs.Driver, Catalog], scratch: Path,
                           tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to sign the test tokens")
    driver, catalog = source
    service = TokenService(tmp_path, "bob", "hunter2")
    try:
        with real_registry(tmp_path / "registry", service.registry_auth()) as registry:
            good = Credentials("bob", "hunter2")
            push(driver, catalog, "v2", f"{registry}/tokens/sample:v2", credentials=good)
            target = Harness("overlay").driver(scratch / "target")
            image = pull(target, Catalog(target.store), f"{registry}/tokens/sample:v2",
                         credentials=good)
            assert merged(target, image.top) == merged(driver, catalog.resolve("v2")[0])
            actions = [set(scope.rpartition(":")[2].split(",")) for scope in service.requests
                       if scope.startswith("repository:tokens/sample:")]
            assert {"pull", "push"} in actions  # the registry orders them as it likes
            with pytest.raises(RegistryAuthError, match="token service"):
                pull(target, Catalog(target.store), f"{registry}/tokens/sample:v2",
                     credentials=Credentials("bob", "wrong"))
    finally:
        service.close()


# ---- a registry that lies or fails ---------------------------------------------------------


@pytest.fixture
def fake() -> FakeRegistry:
    registry = FakeRegistry()
    registry.load_layout(OCI, "latest")
    yield registry
    registry.close()


def pull_from(fake: FakeRegistry, scratch: Path, name: str = "latest") -> aufs.Driver:
    target = Harness("overlay").driver(scratch / "target")
    pull(target, Catalog(target.store), f"{fake.address}/peers/sample:{name}")
    return target


def test_a_fake_registry_serves_a_good_pull(fake: FakeRegistry, scratch: Path) -> None:
    target = pull_from(fake, scratch)
    assert len(target.layer_ids()) == 3


def test_wrong_digest_stores_nothing(fake: FakeRegistry, scratch: Path) -> None:
    manifest = json.loads(fake.manifests["latest"][0])
    last = manifest["layers"][-1]["digest"]
    fake.blobs[last] = fake.blobs[manifest["layers"][0]["digest"]]  # another layer's bytes
    with pytest.raises((DigestMismatchError, aufs.DiffError)):
        pull_from(fake, scratch)
    target = aufs.Driver(scratch / "target", backend="overlay")
    assert len(target.layer_ids()) == 2  # the good layers stay; the bad one is not stored
    assert not any(layer.endswith("-incomplete") for layer in target.layer_ids())
    assert aufs.images.fsck.check(target.root) == []


def test_truncated_blob(fake: FakeRegistry, scratch: Path) -> None:
    manifest = json.loads(fake.manifests["latest"][0])
    first = manifest["layers"][0]["digest"]

    def truncate(handler: object, path: str) -> bool:
        if path.endswith(first):
            blob = fake.blobs[first]
            handler.send_response(200)  # type: ignore[attr-defined]
            handler.send_header("Content-Length", str(len(blob)))  # type: ignore[attr-defined]
            handler.end_headers()  # type: ignore[attr-defined]
            handler.wfile.write(blob[: len(blob) // 2])  # type: ignore[attr-defined]
            handler.close_connection = True  # type: ignore[attr-defined]
            return True
        return False

    fake.faults.append(truncate)
    with pytest.raises(aufs.AufsError):
        pull_from(fake, scratch)
    assert aufs.Driver(scratch / "target", backend="overlay").layer_ids() == []


def test_manifest_pointing_at_missing_blobs(fake: FakeRegistry, scratch: Path) -> None:
    manifest = json.loads(fake.manifests["latest"][0])
    del fake.blobs[manifest["layers"][1]["digest"]]
    with pytest.raises(RegistryNotFoundError, match="404"):
        pull_from(fake, scratch)
    assert len(aufs.Driver(scratch / "target", backend="overlay").layer_ids()) == 1


@pytest.mark.parametrize(("status", "error", "text"), [
    (401, RegistryAuthError, "refused the credentials"),
    (403, RegistryAuthError, "forbidden"),
    (404, RegistryNotFoundError, "not found"),
    (500, RegistryError, "500"),
])
def test_error_statuses(fake: FakeRegistry, scratch: Path, status: int, error: type,
                        text: str) -> None:
    def answer(handler: object, path: str) -> bool:
        handler.send(status, b"{}")  # type: ignore[attr-defined]
        return True

    fake.faults.append(answer)
    with pytest.raises(error, match=text):
        pull_from(fake, scratch)


def test_429_is_retried(fake: FakeRegistry, scratch: Path) -> None:
    budget = [2]

    def too_many(handler: object, path: str) -> bool:
        if budget[0]:
            budget[0] -= 1
            handler.send(429, b"{}", {"Retry-After": "0"})  # type: ignore[attr-defined]
            return True
        return False

    fake.faults.append(too_many)
    assert len(pull_from(fake, scratch).layer_ids()) == 3
    assert budget == [0]


def test_redirect_to_blob_storage_drops_credentials(fake: FakeRegistry, scratch: Path) -> None:
    storage = FakeRegistry()
    storage.blobs = dict(fake.blobs)

    def redirect(handler: object, path: str) -> bool:
        if "/blobs/" in path:
            location = f"http://{storage.address}/storage{path}"
            handler.send(307, b"", {"Location": location})  # type: ignore[attr-defined]
            return True
        return False

    fake.faults.append(redirect)
    try:
        target = Harness("overlay").driver(scratch / "target")
        client_credentials = Credentials("carol", "pw")
        fake.faults.insert(0, _require_basic)
        pull(target, Catalog(target.store), f"{fake.address}/peers/sample:latest",
             credentials=client_credentials)
        assert len(target.layer_ids()) == 3
        assert any(a and a.startswith("Basic ") for a in fake.seen_authorization)
        assert storage.seen_authorization and not any(storage.seen_authorization)
    finally:
        storage.close()


def _require_basic(handler: object, path: str) -> bool:
    if not (handler.headers.get("Authorization") or "").startswith("Basic "):  # type: ignore[attr-defined]
        handler.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})  # type: ignore[attr-defined]
        return True
    return False


def test_an_interrupted_pull_resumes(fake: FakeRegistry, scratch: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from aufs.images import importer
    from aufs.images import pull as pull_module

    original = importer.add_layer
    calls = []

    def fail_on_the_second(*arguments: object, **keywords: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            original(*arguments, **keywords)  # it completes...
            raise KeyboardInterrupt("interrupted")  # ...then the pull is stopped
        original(*arguments, **keywords)

    monkeypatch.setattr(pull_module, "add_layer", fail_on_the_second)
    target = Harness("overlay").driver(scratch / "target")
    with pytest.raises(KeyboardInterrupt):
        pull(target, Catalog(target.store), f"{fake.address}/peers/sample:latest")
    monkeypatch.undo()
    assert len(target.layer_ids()) == 2
    image = pull(target, Catalog(target.store), f"{fake.address}/peers/sample:latest")
    assert len(image.created) == 1  # only the layer that was missing


# ---- exact diffs: images keep their digests through pull and push ---------------------------


def test_pull_push_pull_back_stores_nothing_new(scratch: Path, tmp_path: Path) -> None:
    driver = Harness("overlay").driver(scratch / "store")
    catalog = Catalog(driver.store)
    with real_registry(tmp_path / "one") as one, real_registry(tmp_path / "two") as two:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{OCI}:insert",
                        f"docker://{one}/upstream/sample:insert"], check=True,
                       capture_output=True)
        source_manifest = RegistryClient(Reference.parse(f"{one}/upstream/sample:insert")
                                         ).get_manifest("insert")[2]
        pulled = pull(driver, catalog, f"{one}/upstream/sample:insert")
        assert len(pulled.created) == 4
        # within one registry: every blob is mounted across, and the manifest is the same
        pushed = push(driver, catalog, f"{one}/upstream/sample:insert",
                      f"{one}/copies/sample:insert")
        assert pushed.uploaded == (
            pushed.uploaded[0],) and len(pushed.mounted) == 4  # only the config is new there
        assert pushed.manifest_digest == source_manifest
        again = pull(driver, catalog, f"{one}/copies/sample:insert")
        assert again.created == () and again.config_digest == pulled.config_digest
        # to another registry: blobs are compressed anew, but diff_ids and config are kept
        push(driver, catalog, f"{one}/upstream/sample:insert", f"{two}/elsewhere/sample:1")
        back = pull(driver, catalog, f"{two}/elsewhere/sample:1")
        assert back.created == () and back.layers == pulled.layers
        assert back.config_digest == pulled.config_digest
