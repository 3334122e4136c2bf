"""Layer ids: Docker's 64-hex ids and [A-Za-z0-9_.-] names pass; everything else is refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import aufs
from aufs.ids import validate_layer_id


@pytest.mark.parametrize(
    "layer_id",
    [hashlib.sha256(b"x").hexdigest(), "Base", "a.b-c_d", "1", "x" * 255, "-removingx", ".wh.x"],
)
def test_accepted(layer_id: str) -> None:
    assert validate_layer_id(layer_id) == layer_id


@pytest.mark.parametrize(
    ("layer_id", "reason"),
    [
        ("", "empty"),
        (".", "directory"),
        ("..", "directory"),
        ("a/b", "'/'"),
        ("../etc", "'/'"),
        ("a\0b", "'\\\\x00'"),
        ("a,b", "','"),
        ("a:b", "':'"),
        ("a=b", "'='"),
        ("a b", "' '"),
        ("layer-removing", "-removing"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),
        (42, "must be a str"),
    ],
)
def test_refused_with_the_reason(layer_id: object, reason: str) -> None:
    with pytest.raises(aufs.InvalidLayerIDError, match=reason) as caught:
        validate_layer_id(layer_id)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, aufs.AufsError)


def test_every_driver_entry_point_validates(tmp_path: Path) -> None:
    recorder = aufs.RecordingMounter()
    from aufs.machine import Kernel

    backend = aufs.AufsBackend(recorder, kernel=Kernel(frozenset({"aufs"}), False),
                               dirperm1=False, auplink=None)
    driver = aufs.Driver(tmp_path / "root", backend=backend)
    for call in (driver.create, driver.create_read_write, driver.remove, driver.get,
                 driver.put, driver.exists, driver.get_metadata):
        with pytest.raises(aufs.InvalidLayerIDError):
            call("../escape")
    with pytest.raises(aufs.InvalidLayerIDError, match="parent id"):
        driver.create("ok", "bad/parent")
    assert driver.layer_ids() == []
