"""``toolcell`` on PATH: what ``pip install .`` gives, and what scripts/setup.sh links.

The install runs offline: the source (pyproject.toml and runtime/) is copied to a temporary directory and
installed with ``--no-deps --no-build-isolation --no-index`` into a fresh venv whose dependencies come from
the checkout's .venv (one path line in a .pth file, so the editable install there is not picked up).
setup.sh's ``ensure_cli_link`` runs in a throwaway mount namespace whose /usr/local/bin is an overlay.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.support import REPO

VENV = REPO / ".venv"
SETUP = REPO / "scripts" / "setup.sh"
BARE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_pip_install_gives_a_toolcell_command(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "runtime", src / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "_checkout_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(src)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]

    env = {"PATH": f"{venv / 'bin'}:{BARE_PATH}", "HOME": str(tmp_path)}
    assert shutil.which("toolcell", path=env["PATH"]) == str(venv / "bin" / "toolcell")
    version = subprocess.run(["toolcell", "version", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert json.loads(version.stdout)["toolcell"] == project["version"]
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import toolcell; print(toolcell.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert where.stdout.startswith(str(purelib / "toolcell")), where.stdout  # the installed copy, not the checkout


# (case, shell set-up before ensure_cli_link, a line its log must hold, where `toolcell` is found after it)
LINK_CASES = [
    ("nothing on PATH", "", "cli: linked /usr/local/bin/toolcell -> {venv}/bin/toolcell: toolcell is on PATH",
     "/usr/local/bin/toolcell"),
    ("already linked", "ln -s {venv}/bin/toolcell /usr/local/bin/toolcell",
     "cli: /usr/local/bin/toolcell -> {venv}/bin/toolcell", "/usr/local/bin/toolcell"),
    ("a removed checkout's link", "ln -s /nonexistent/.venv/bin/toolcell /usr/local/bin/toolcell",
     "cli: replacing /usr/local/bin/toolcell, a dangling link to /nonexistent/.venv/bin/toolcell",
     "/usr/local/bin/toolcell"),
    ("the reader's own install", "mkdir -p {own} && printf '#!/bin/sh\\necho own\\n' >{own}/toolcell && "
     "chmod +x {own}/toolcell && export PATH={own}:$PATH",
     "cli: toolcell on PATH is {own}/toolcell; /usr/local/bin/toolcell not made", "{own}/toolcell"),
]


@pytest.mark.parametrize(("case", "before", "logged", "resolves"), LINK_CASES, ids=[c[0] for c in LINK_CASES])
def test_setup_links_toolcell_on_path(case: str, before: str, logged: str, resolves: str, tmp_path: Path) -> None:
    scratch, own = tmp_path / "scratch", tmp_path / "own"
    scratch.mkdir()
    values = {"venv": str(VENV), "own": str(own)}
    script = f"""
set -euo pipefail
mount -t tmpfs docs-test {scratch}
mkdir -p {scratch}/upper {scratch}/work
mount -t overlay overlay -o lowerdir=/usr/local/bin,upperdir={scratch}/upper,workdir={scratch}/work /usr/local/bin
rm -f /usr/local/bin/toolcell
export PATH={BARE_PATH}
log() {{ printf 'setup: %s\\n' "$*" >&2; }}
VENV={VENV}
{before.format(**values)}
eval "$(sed -n '/^readonly CLI_LINK=/,/^}}/p' {SETUP})"
ensure_cli_link
command -v toolcell
toolcell version >/dev/null
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert logged.format(**values) in proc.stderr, proc.stderr
    assert proc.stdout.strip() == resolves.format(**values)
