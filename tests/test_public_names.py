"""Every public name keeps its import path: the ones DESIGN.md makes a contract, and every
`aufs....` name the README shows in Python."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest

import aufs
from conftest import REPO

CONTRACT = [
    "Driver", "CreateOpts", "Change", "ChangeKind", "FileGetter", "AufsError",
    "NotSupportedError", "IncompatibleFSError", "InvalidLayerIDError", "LayerNotFoundError",
    "LayerExistsError", "LayerInUseError", "MountError", "UnmountBusyError", "DiffError",
    "aufs_mount_data", "mount", "unmount", "FsMagic", "fs_magic", "mounted", "is_mountpoint",
    "directory_size", "IMPLEMENTATION", "get_include",
]


def resolve(dotted: str) -> Any:
    """Imports the longest module prefix of dotted, then follows the attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:end]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[end:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def readme_names() -> list[str]:
    text = (REPO / "README.md").read_text()
    python = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    inline = " ".join(re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)))
    names = set(re.findall(r"\baufs(?:\.[A-Za-z_]\w*)+", python + " " + inline))
    return sorted(name for name in names if not name.endswith((".py", ".pyx", ".pxd")))


@pytest.mark.parametrize("name", CONTRACT)
def test_the_contract_names_import_from_the_top(name: str) -> None:
    assert name in aufs.__all__
    assert getattr(aufs, name) is not None


def test_every_name_in___all___resolves() -> None:
    for name in aufs.__all__:
        getattr(aufs, name)


def test_the_readme_shows_names() -> None:
    names = readme_names()
    assert "aufs.Driver" in names and "aufs.images.pull" in names, names


@pytest.mark.parametrize("name", readme_names())
def test_every_name_the_readme_shows_imports(name: str) -> None:
    resolve(name)


def test_resolve_fails_on_a_name_that_does_not_exist() -> None:
    with pytest.raises(AttributeError):
        resolve("aufs.images.no_such_thing")
