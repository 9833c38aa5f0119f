"""The installed import name: ``toolcell``, mapped from runtime/ (the layout's name), complete and working."""

from __future__ import annotations

import tomllib
from pathlib import Path

import toolcell

REPO = Path(__file__).resolve().parents[2]


def test_every_package_under_runtime_is_installed_as_toolcell() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"toolcell": "runtime"}
    on_disk = {"toolcell" + ("." + ".".join(p.parent.relative_to(REPO / "runtime").parts)
                             if p.parent != REPO / "runtime" else "")
               for p in (REPO / "runtime").rglob("__init__.py")}
    assert set(setuptools["packages"]) == on_disk, "a package under runtime/ would be missing from the wheel"


def test_the_symlink_and_the_import_name_point_at_runtime() -> None:
    assert (REPO / "toolcell").is_symlink() and (REPO / "toolcell").resolve() == REPO / "runtime"
    assert Path(toolcell.__file__).resolve().parent == REPO / "runtime"
    assert not (REPO / "runtime" / "runtime").exists()
