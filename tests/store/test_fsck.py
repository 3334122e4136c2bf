"""fsck's repairs of broken layers: the default never deletes a layer whose own content is
on disk; force=True removes a broken layer and every layer built on it, except what is
mounted or held (and the broken layers below that)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

import aufs
from aufs.store import fsck
from aufs.store.locking import LayerReferences
from conftest import IS_ROOT, Harness
from tarbuild import archive, member

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="the fsck tests mount filesystems")


def build(driver: aufs.Driver, chains: dict[str, str]) -> None:
    """Creates each layer (in order) on its parent, with one file of its own."""
    for layer, parent in chains.items():
        driver.create(layer, parent)
        driver.apply_diff(layer, parent, io.BytesIO(archive([member(layer, data=b"data")])))


def removed_ids(repaired: list[fsck.Problem]) -> list[str]:
    return [problem.subject for problem in repaired if problem.code == "removed-layer"]


def test_the_default_repair_keeps_a_broken_chain(driver: aufs.Driver) -> None:
    build(driver, {"base": "", "mid": "base", "top": "mid", "top2": "mid", "other": "base"})
    shutil.rmtree(driver.store.diff_path("mid"))
    repaired, remaining = fsck.repair(driver.root)
    assert repaired == []
    assert [(p.code, p.subject) for p in remaining] == [("missing-diff", "mid")]
    assert "--force" in remaining[0].repair
    assert set(driver.layer_ids()) == {"base", "mid", "top", "top2", "other"}


def test_force_removes_the_broken_layer_and_everything_built_on_it(driver: aufs.Driver
                                                                    ) -> None:
    build(driver, {"base": "", "mid": "base", "top": "mid", "top2": "mid", "other": "base",
                   "lonely": ""})
    shutil.rmtree(driver.store.diff_path("mid"))
    shutil.rmtree(driver.store.diff_path("lonely"))  # a leaf: the default repair handles it
    repaired, remaining = fsck.repair(driver.root, force=True)
    assert remaining == []
    assert [p.code for p in repaired].count("missing-diff") == 1  # lonely, without force
    assert removed_ids(repaired) == ["top", "top2", "mid"]  # leaves first
    assert sorted(driver.layer_ids()) == ["base", "other"]
    for layer in ("mid", "top", "top2"):
        for path in (driver.store.diff_path(layer), driver.store.mount_path(layer),
                     driver.store.work_path(layer)):
            assert not os.path.lexists(path)
    assert fsck.check(driver.root) == []
    for layer in ("base", "other"):
        assert Path(driver.store.diff_path(layer), layer).read_bytes() == b"data"


@pytest.mark.parametrize("damage", ["missing-parent", "corrupt-layers-file",
                                    "inconsistent-chain"])
def test_force_removes_layers_whose_chain_is_broken(driver: aufs.Driver, damage: str) -> None:
    build(driver, {"base": "", "mid": "base", "top": "mid", "keep": "base"})
    layers_file = Path(driver.store.layer_file("mid"))
    if damage == "missing-parent":
        layers_file.write_text("gone\nbase\n")
    elif damage == "corrupt-layers-file":
        layers_file.write_bytes(b"../../etc\n")
    else:
        Path(driver.store.layer_file("top")).write_text("mid\n")  # lost "base"
    broken = "top" if damage == "inconsistent-chain" else "mid"
    before = fsck.check(driver.root)
    assert damage in {p.code for p in before if p.subject == broken}
    assert fsck.repair(driver.root)[0] == []  # the content is on disk: not without force
    repaired, remaining = fsck.repair(driver.root, force=True)
    assert remaining == []
    expected = ["top"] if broken == "top" else ["top", "mid"]
    assert removed_ids(repaired) == expected
    assert sorted(driver.layer_ids()) == sorted({"base", "mid", "keep"} - set(expected))


def test_force_keeps_a_held_layer_and_the_broken_layers_below_it(driver: aufs.Driver
                                                                  ) -> None:
    build(driver, {"base": "", "mid": "base", "held": "mid", "free": "mid"})
    held = LayerReferences.hold_shared(driver.store.diff_path("held"))  # a diff under way
    try:
        shutil.rmtree(driver.store.diff_path("mid"))
        repaired, remaining = fsck.repair(driver.root, force=True)
        assert removed_ids(repaired) == ["free"]
        kept = {p.subject: p.message for p in remaining if p.code == "broken-layer-in-use"}
        assert kept.keys() == {"held", "mid"}
        assert kept["held"].startswith("held by a process")
        assert "held builds on it" in kept["mid"]
        assert sorted(driver.layer_ids()) == ["base", "held", "mid"]
    finally:
        os.close(held)
    repaired, remaining = fsck.repair(driver.root, force=True)
    assert removed_ids(repaired) == ["held", "mid"] and remaining == []


def test_force_keeps_a_mounted_layer_and_the_broken_layers_below_it(harness: Harness,
                                                                     scratch: Path) -> None:
    harness.require_union()
    driver = harness.driver(scratch / "aufs")
    build(driver, {"base": "", "mid": "base", "mounted": "mid", "free": "mid"})
    path = driver.get("mounted")
    try:
        shutil.rmtree(driver.store.diff_path("mid"))
        repaired, remaining = fsck.repair(driver.root, force=True)
        assert removed_ids(repaired) == ["free"]
        kept = {p.subject: p.message for p in remaining if p.code == "broken-layer-in-use"}
        assert kept.keys() == {"mounted", "mid"}
        assert kept["mounted"].startswith("mounted")
        assert harness.is_mounted(path)
        if harness.name != "aufs":  # aufs answers ESTALE through a mount whose branch is gone
            assert Path(path, "mounted").read_bytes() == b"data"
    finally:
        driver.put("mounted")
    repaired, remaining = fsck.repair(driver.root, force=True)
    assert removed_ids(repaired) == ["mounted", "mid"] and remaining == []
    assert driver.layer_ids() == ["base"]
    driver.cleanup()
