"""Short runs of the reliability campaigns in tests/campaigns/ (the long runs are commands:
see each module's docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaigns import concurrency, crash, fuzz
from conftest import IS_ROOT, backend_unavailable


@pytest.mark.skipif(bool(backend_unavailable("fuse-overlayfs")),
                    reason=str(backend_unavailable("fuse-overlayfs")))
def test_crash_campaign_short(tmp_path: Path) -> None:
    result = crash.run_campaign(str(tmp_path / "root"), kills=40, seed=7,
                                backend="fuse-overlayfs")
    assert result.kills == 40
    assert result.layers_checked > 40
    assert result.violations == []


@pytest.mark.skipif(not IS_ROOT, reason="devices and owners in archives need root")
def test_fuzz_apply_short(tmp_path: Path) -> None:
    arena = fuzz.Arena(tmp_path)
    fuzz.fuzz_apply(arena, examples=300, seed=3)
    assert arena.examples == 300


def test_fuzz_layers_parser_and_mount_data_short(tmp_path: Path) -> None:
    fuzz.fuzz_layers_parser(tmp_path, examples=200)
    fuzz.fuzz_mount_data(examples=200)


@pytest.mark.skipif(bool(backend_unavailable("overlay")),
                    reason=str(backend_unavailable("overlay")))
def test_concurrency_campaign_short(tmp_path: Path) -> None:
    total, violations = concurrency.run_campaign(str(tmp_path / "root"), seconds=8, threads=3,
                                                 processes=2, backend="overlay")
    assert total.operations > 100
    assert violations == []


def test_fuzz_threads_short(tmp_path: Path) -> None:
    """Two appliers and a differ on one driver (issue 16): nothing crosses layers."""
    arena = fuzz.Arena(tmp_path)
    result = fuzz.race_appliers_and_differ(arena.driver, arena.sentinel, rounds=8, seed=5)
    assert result.violations == []
    assert result.applied >= 16 and result.diffs >= 1
