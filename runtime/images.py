"""`toolcell images build`: build the runner images by running the checkout's ``images/build.sh``.

The images are built offline (debootstrap + ``docker import``, then ``docker build``; no registry) by the
shell script, which is also what ``scripts/setup.sh`` runs; this module only finds it and runs it.
Re-running is quick when nothing changed: each image carries an inputs-hash label the script compares.
"""

from __future__ import annotations

import shutil
import subprocess  # nosec B404 (one fixed script, argv list, no shell: see build_images)
from pathlib import Path

from toolcell.errors import ConfigError

BASE_IMAGE = "toolcell/debian:bookworm"
"""Debian bookworm minbase root filesystem (debootstrap + ``docker import``)."""

PYTHON_IMAGE = "toolcell/python:bookworm"
"""The Python runner: Python 3 + full stdlib, user ``tool`` (10001:10001), no setuid/setgid files."""

TOOLS_DIR = "/opt/toolcell/tools"
"""Where the example tools live inside PYTHON_IMAGE (``wordcount.py``, ``pyrun.py``)."""

INPUTS_HASH_LABEL = "io.toolcell.inputs-hash"
"""Label on every toolcell image: sha256 of the inputs it was built from."""

BUILD_SCRIPT = Path("images") / "build.sh"


def default_repo_root() -> Path:
    """The checkout this package lives in (the parent of the ``runtime`` package directory)."""
    return Path(__file__).resolve().parent.parent


def build_script(repo_root: Path | None = None) -> Path:
    """Path of ``images/build.sh`` under `repo_root`; ConfigError when it is not there."""
    root = repo_root if repo_root is not None else default_repo_root()
    script = root / BUILD_SCRIPT
    if not script.is_file():
        raise ConfigError(
            f"image build script not found at {script}; `toolcell images build` must run from a toolcell "
            "checkout (install with `pip install -e .`)",
            key="images",
        )
    return script


def build_images(repo_root: Path | None = None) -> int:
    """Run ``images/build.sh``, its output streaming to our stdout/stderr; return its exit status.

    Raises ConfigError when the script, ``bash`` or the ``docker`` CLI is missing.
    """
    script = build_script(repo_root)
    bash = shutil.which("bash")
    if bash is None:
        raise ConfigError("bash is not installed; it is needed to run images/build.sh", key="images")
    if shutil.which("docker") is None:
        raise ConfigError(
            "the docker CLI is not installed; run scripts/setup.sh (installs Debian's docker.io) first",
            key="images",
        )
    # Inherit stdio so progress streams as it happens.  Justification for the nosec/noqa: the argv is
    # fixed (bash + our own script from the checkout), no shell, nothing from the caller reaches it.
    completed = subprocess.run(  # noqa: S603  # nosec B603
        [bash, str(script)], cwd=script.parent.parent, check=False
    )
    return completed.returncode
