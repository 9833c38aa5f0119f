"""Every fenced block of the docs, checked by kind, as written.

README.md, deploy/README.md, images/README.md and docs/*.md are read; each fenced block is one of:

- a toolcell configuration (YAML whose top-level keys are config keys): a whole one (``version:``) or a
  fragment, merged into the built-in default config (mappings key by key, ``tools``/``servers`` entries by
  name, so ``- name: text.wordcount`` plus ``pool:`` adds a pool to that tool); either must pass
  ``toolcell profiles check``;
- Kubernetes or compose YAML (``apiVersion:``, ``services:``, a list of containers): parsed here, validated
  by tests/unit/test_kubernetes.py and test_deploy.py;
- JSON (client configurations): valid JSON;
- Python: compiled here, run as written by tests/integration/test_readme_mcp.py;
- shell: every command line runs as written (``$ `` lines only, when a block shows output), or is listed in
  ``SKIPS`` with its reason, or is a synopsis (``[--option]``, or a block marked
  ``<!-- docs-test: synopsis -->``), whose subcommand and options are checked against ``--help``.

Commands run in a throwaway mount and network namespace (``unshare``) so that "as written" is safe on a
shared machine: /etc, /var/log, /var/lib/toolcell and /opt are overlays whose writes go to a tmpfs,
/run/toolcell is this test's supervisor's socket directory (the default socket for root), the network is a
fresh loopback, and ``toolcell`` is first on PATH. The working directory holds the checkout's ``.venv``,
``scripts``, ``images`` and ``deploy`` (the docs' commands start in a checkout) and ``toolcell.yaml``, the
nearest configuration block above the command block (its section's config).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.security_support import Pki
from tests.support import REPO, engine, serving
from toolcell.settings import parse_config

DOCS = ("README.md", "deploy/README.md", "images/README.md",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_CONFIG = REPO / "runtime" / "data" / "default-config.yaml"
CONFIG_KEYS = frozenset(json.loads((REPO / "runtime" / "data" / "config.schema.json").read_text())["properties"])

# Commands not run, each with why. Matched against a command line (continuations joined) by regex search, per
# document. Every entry must match a command (test_every_skip_is_used), and nothing else is skipped.
SKIPS: tuple[tuple[str, str, str], ...] = (
    ("README.md", r"^bash scripts/demo\.sh$",
     "runs scripts/setup.sh first (apt, the engine, rebuilding images every test on the machine shares); what it "
     "then shows (serve, tools, call, oci, a stock MCP server) runs in the blocks below"),
    ("README.md", r"^bash scripts/test\.sh$", "the whole CI run (20 minutes): it is what runs this test"),
    ("README.md", r"^toolcell images mcp --(pypi|npm) ",
     "an unpinned request fetches from PyPI/npm; tests send traffic to loopback only (images/README.md's pinned "
     "requests run, offline)"),
    ("README.md", r"^pip install \.", "installs dependencies from PyPI (network); tests/integration/test_install.py "
     "installs the checkout offline (--no-deps) into a fresh venv and runs its toolcell"),
    ("README.md", r"^TOOLCELL_TOKEN=\"\$\(get-token\)\"",
     "get-token is the reader's identity provider; bearer-token calls run in tests/integration/test_access.py"),
    ("README.md", r"--target localhost:7443 --tls-ca",
     "needs an mTLS supervisor on :7443 and a client certificate; tests/integration/test_access.py::"
     "test_mtls_identity_from_the_client_certificate runs that config"),
    ("deploy/README.md", r"^(bash scripts/setup\.sh|apt-get install)", "installs packages and builds images as root"),
    ("deploy/README.md", r"^(cd deploy/compose|export DOCKER_GID|docker-compose )",
     "a compose project on the machine's shared engine (docker-compose is not installed here); the files are "
     "checked by tests/unit/test_deploy.py"),
    ("deploy/README.md", r"^vi ", "an editor"),
    ("deploy/README.md", r"^kubectl ", "needs a Kubernetes cluster; the manifests are checked by "
     "tests/unit/test_kubernetes.py"),
    ("deploy/README.md", r"^(/opt/toolcell/bin/toolcell|chown toolcell:)",
     "the systemd unit's install layout (/opt/toolcell venv, system user toolcell), made by the unit's own steps"),
    ("deploy/README.md", r"^osv-scanner ", "scans against OSV's advisory database: network (not installed here)"),
    ("deploy/README.md", r"pip install pip-audit", "installs from PyPI and asks PyPI's advisory data: network"),
    ("images/README.md", r"images/build\.sh",
     "rebuilds the images every test shares (scripts/setup.sh runs it; tests/integration/test_images.py checks them)"),
)

# What a fragment presupposes from elsewhere in the docs, merged in before it is checked: (document, a line of
# the block, config). Keep it rare: a block should stand on its own.
CONTEXT: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("README.md", "secrets: [{name: fetch-token, env: API_TOKEN}]", {
        "profiles": {"web": {"extends": "default", "network": ["api.example.com"]},  # "Network grants"
                     "web-strict": {"extends": "web", "memory": "128Mi"}},
        "secrets": {"store": "/var/lib/toolcell/secrets.json", "key_file": "/etc/toolcell/secrets.key"}}),
)

# Commands that serve until stopped: started in the background, the probe run until it passes (60 s at
# most), then SIGTERM; the command must exit with one of the statuses given.
DAEMONS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    (r"\btoolcell serve\b", "toolcell health", (0,)),  # drains, then exits 0 (deploy/README.md: Shutdown)
    # SIGTERM: the bridge shuts down cleanly and exits 0, like serve.
    (r"\btoolcell mcp --transport http --listen 127\.0\.0\.1:8765$",
     "curl -fsS -o /dev/null -H 'Host: 127.0.0.1:8765' http://127.0.0.1:8765/healthz", (0,)),
)

# Commands that talk to a supervisor: their block gets one, on the default socket's directory.
SUPERVISED = re.compile(r"\btoolcell (tools|call|health|reload|audit|client|mcp|session)\b")
# A reader's environment: what the docs' commands expect to find set.
READER_ENV = {"TOKEN": "docs-example-token-0f3a9c"}


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence
    lang: str
    text: str
    hint: str  # the <!-- docs-test: ... --> comment right before the block, if any

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Command:
    text: str
    skip: str | None  # the reason, when SKIPS lists it
    daemon_probe: str | None
    synopsis: bool
    daemon_exits: tuple[int, ...] = (0,)


FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```\s*$", re.M | re.S)
HINT = re.compile(r"<!--\s*docs-test:\s*(?P<hint>[^>]*?)\s*-->\s*$")


def blocks(doc: str) -> list[Block]:
    text = (REPO / doc).read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        hint = HINT.search(before)
        indent = len(m.group("indent"))
        body = "".join(line[indent:] for line in m.group("body").splitlines(keepends=True))
        found.append(Block(doc, text.count("\n", 0, m.start()) + 1, m.group("lang"), body,
                           hint.group("hint") if hint else ""))
    return found


ALL_BLOCKS = [b for doc in DOCS for b in blocks(doc)]


def by_lang(*langs: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.lang in langs]


# ---- YAML ----------------------------------------------------------------------------------------------

def yaml_kind(doc: Any) -> str:
    """config | kubernetes | compose, or raise: every YAML block is one of them."""
    if isinstance(doc, list) and doc and all(isinstance(c, dict) and {"name", "image"} <= c.keys() for c in doc):
        return "kubernetes"  # containers of a pod spec
    if not isinstance(doc, dict):
        raise AssertionError(f"a YAML block that is neither a config nor a manifest: {str(doc)[:80]}")
    if "apiVersion" in doc and "kind" in doc:
        return "kubernetes"
    if "services" in doc:
        return "compose"
    unknown = set(doc) - CONFIG_KEYS
    assert not unknown, f"not a toolcell config: unknown top-level keys {sorted(unknown)}"
    return "config"


def merge(base: Any, patch: Any) -> Any:
    """A fragment over the default config: mappings key by key, lists of named entries by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in patch.items()}}
    named = isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(e, dict) and "name" in e for e in base + patch)
    if named:
        out = list(base)
        names = [e["name"] for e in base]
        for entry in patch:
            if entry["name"] in names:
                i = names.index(entry["name"])
                out[i] = merge(out[i], entry)
            else:
                out.append(entry)
        return out
    return patch


def as_config(block: Block) -> dict[str, Any]:
    doc = yaml.safe_load(block.text)
    if "version" in doc:
        return dict(doc)
    base = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for doc_name, line, context in CONTEXT:
        if doc_name == block.doc and line in block.text:
            base = merge(base, context)
    return dict(merge(base, doc))


def safe_kind(block: Block) -> str:
    """yaml_kind, or "invalid" (a config to its test, which then fails naming the error)."""
    try:
        return yaml_kind(yaml.safe_load(block.text))
    except (yaml.YAMLError, AssertionError):
        return "invalid"


def config_blocks() -> list[Block]:
    return [b for b in by_lang("yaml", "yml") if safe_kind(b) in ("config", "invalid")]


def section_config(block: Block) -> dict[str, Any] | None:
    """The nearest configuration block above ``block`` in its document (the config its section describes)."""
    above = [b for b in config_blocks() if b.doc == block.doc and b.line < block.line and safe_kind(b) == "config"]
    return as_config(above[-1]) if above else None


# ---- shell ---------------------------------------------------------------------------------------------

def command_lines(block: Block) -> list[str]:
    """The command lines of a shell block: continuations joined; only ``$ `` lines when it shows output."""
    raw: list[str] = []
    for line in block.text.replace("\\\n", " ").splitlines():
        if line.startswith((" ", "\t")) and raw:  # a synopsis continues on indented lines
            raw[-1] += " " + line.strip()
        else:
            raw.append(line)
    if any(line.startswith("$ ") for line in raw):
        raw = [line[2:] for line in raw if line.startswith("$ ")]
    return [line.strip() for line in raw if line.strip() and not line.lstrip().startswith("#")]


def without_comment(line: str) -> str:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return " ".join(lexer)


def strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a ``#`` after a blank, outside quotes), as the shell reads it."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def classify(block: Block, line: str) -> Command:
    bare = without_comment(line)
    skip = next((reason for doc, pattern, reason in SKIPS if doc == block.doc and re.search(pattern, line)), None)
    probe, exits = next(((p, e) for pattern, p, e in DAEMONS if re.search(pattern, strip_comment(line))),
                        (None, (0,)))
    synopsis = block.hint == "synopsis" or "[-" in bare
    return Command(line, skip, probe, synopsis, exits)


def commands(block: Block) -> list[Command]:
    return [classify(block, line) for line in command_lines(block)]


SHELL = by_lang("sh", "bash", "console", "shell")


# ---- the checks that need no engine -------------------------------------------------------------------

def test_the_docs_have_blocks_of_every_kind() -> None:
    langs = {b.lang for b in ALL_BLOCKS}
    assert {"sh", "yaml", "json", "python"} <= langs
    unknown = langs - {"sh", "bash", "console", "shell", "yaml", "yml", "json", "python", ""}
    assert not unknown, f"a block kind this test does not check: {unknown}"
    assert all(b.hint in ("", "synopsis") for b in ALL_BLOCKS), [b.id for b in ALL_BLOCKS if b.hint]


@pytest.mark.parametrize("block", by_lang("yaml", "yml"), ids=lambda b: b.id)
def test_yaml_block_is_a_config_or_a_manifest(block: Block) -> None:
    kind = yaml_kind(yaml.safe_load(block.text))
    if kind == "kubernetes":
        assert block.doc == "deploy/README.md", "Kubernetes YAML outside deploy/README.md"


@pytest.mark.parametrize("block", by_lang("json"), ids=lambda b: b.id)
def test_json_block_is_json(block: Block) -> None:
    value = json.loads(block.text)
    assert isinstance(value, dict) and value


@pytest.mark.parametrize("block", by_lang("python"), ids=lambda b: b.id)
def test_python_block_compiles_and_is_run_elsewhere(block: Block) -> None:
    compile(block.text, block.id, "exec")
    from tests.integration import test_readme_mcp as run_by

    run = run_by.blocks(run_by.section("Use from an MCP server"), "python") + \
        run_by.blocks(run_by.section("Sessions and workspaces: state across calls, files in and out"), "python")
    assert block.doc == "README.md" and block.text in run, "a Python block that no test runs"


def test_every_skip_is_used() -> None:
    used = {(doc, pattern) for doc, pattern, _ in SKIPS
            if any(c.skip is not None and re.search(pattern, c.text)
                   for b in SHELL if b.doc == doc for c in commands(b))}
    assert used == {(doc, pattern) for doc, pattern, _ in SKIPS}


def test_every_context_is_used() -> None:
    assert all(any(b.doc == doc and line in b.text for b in config_blocks()) for doc, line, _ in CONTEXT)


def test_every_daemon_is_used() -> None:
    used = {p for p, _, _ in DAEMONS if any(re.search(p, c.text) for b in SHELL for c in commands(b))}
    assert used == {p for p, _, _ in DAEMONS}


def help_text(words: list[str]) -> str:
    proc = subprocess.run([str(VENV_BIN / "toolcell"), *words, "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"toolcell {' '.join(words)} --help: {proc.stderr[-400:]}"
    return proc.stdout


SYNOPSES = [(b, c) for b in SHELL for c in commands(b) if c.synopsis and c.skip is None]


@pytest.mark.parametrize(("block", "command"), SYNOPSES, ids=[f"{b.id}:{c.text[:40]}" for b, c in SYNOPSES])
def test_synopsis_names_real_subcommands_and_options(block: Block, command: Command) -> None:
    words = without_comment(command.text).split()
    program = words.pop(0)
    assert program in ("toolcell", ".venv/bin/toolcell"), program
    sub: list[str] = []
    for word in words:
        if word.startswith(("-", "[")) or not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        sub.append(word)
    assert sub, command.text
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", without_comment(command.text)))
    text = help_text(sub)
    missing = {o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text)}
    assert not missing, f"toolcell {' '.join(sub)}: options not in --help: {sorted(missing)}"


# ---- the sandbox the commands run in ------------------------------------------------------------------

PRELUDE = r"""
set -u
mount -t tmpfs -o mode=0700 docs-test "$DOCS_SCRATCH"
for d in /etc /var/log /var/lib/toolcell /opt; do      # the reader's machine: writes land in the tmpfs
  mkdir -p "$DOCS_SCRATCH/upper$d" "$DOCS_SCRATCH/work$d" "$d"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$DOCS_SCRATCH/upper$d,workdir=$DOCS_SCRATCH/work$d" "$d"
done
mkdir -p /run/toolcell
if [ -n "${DOCS_RUN_DIR:-}" ]; then mount --bind "$DOCS_RUN_DIR" /run/toolcell
else mount -t tmpfs -o mode=0700 run-toolcell /run/toolcell; fi
if [ -n "${DOCS_LOG_DIR:-}" ]; then mkdir -p /var/log/toolcell && mount --bind "$DOCS_LOG_DIR" /var/log/toolcell; fi
ip link set lo up
cd "$DOCS_CWD"
unset DOCS_SCRATCH DOCS_RUN_DIR DOCS_LOG_DIR DOCS_CWD
"""


def script(cmds: list[Command], status_file: str) -> str:
    lines = [PRELUDE]
    for i, cmd in enumerate(cmds):
        if cmd.daemon_probe:
            lines.append(f"{strip_comment(cmd.text)} &\n__pid=$!; __ok=0\n"
                         f"for __i in $(seq 200); do {cmd.daemon_probe} >/dev/null 2>&1 && {{ __ok=1; break; }}; "
                         "kill -0 $__pid 2>/dev/null || break; sleep 0.3; done\n"
                         "kill -TERM $__pid 2>/dev/null; wait $__pid; __rc=$?\n"
                         f"case $__rc in {'|'.join(map(str, cmd.daemon_exits))}) __rc=0;; esac\n"
                         f"[ $__ok = 1 ] || __rc=\"not ready ($__rc)\"\necho \"{i} $__rc\" >>{status_file}")
        else:
            lines.append(f"{cmd.text}\necho \"{i} $?\" >>{status_file}")
    return "\n".join(lines) + "\n"


def reader_env(home: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TERM", "TZ")}
    return {**keep, **READER_ENV, "HOME": str(home), "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:"
            "/usr/sbin:/usr/bin:/sbin:/bin"}


def working_dir(root: Path, config: dict[str, Any] | None) -> Path:
    cwd = root / "cwd"
    cwd.mkdir()
    for name in (".venv", "scripts", "images", "deploy", "runtime", "proto", "pyproject.toml"):
        (cwd / name).symlink_to(REPO / name)
    if config is not None:
        (cwd / "toolcell.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return cwd


@dataclass(frozen=True)
class Run:
    statuses: dict[int, str]
    stdout: str
    stderr: str


def run_sandboxed(root: Path, cmds: list[Command], cwd: Path, run_dir: Path | None = None,
                  log_dir: Path | None = None, timeout: float = 300) -> Run:
    scratch = root / "scratch"
    scratch.mkdir()
    status = root / "status"
    home = root / "home"
    home.mkdir(exist_ok=True)
    env = {**reader_env(home), "DOCS_SCRATCH": str(scratch), "DOCS_CWD": str(cwd),
           "DOCS_RUN_DIR": str(run_dir or ""), "DOCS_LOG_DIR": str(log_dir or "")}
    proc = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "bash", "-c",
                           script(cmds, shlex.quote(str(status)))], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    statuses = {}
    if status.exists():
        for line in status.read_text().splitlines():
            i, rc = line.split(" ", 1)
            statuses[int(i)] = rc
    return Run(statuses, proc.stdout, proc.stderr)


@contextlib.asynccontextmanager
async def supervisor(root: Path, config: dict[str, Any] | None) -> AsyncIterator[tuple[Path, Path]]:
    """A supervisor for the section's config, its socket in a directory that becomes /run/toolcell, its audit
    trail (rotated at 2 KiB, so rotated files exist) in one that becomes /var/log/toolcell."""
    run_dir, log_dir = root / "run", root / "log"
    for d in (run_dir, log_dir):
        d.mkdir(mode=0o700)
    doc = copy.deepcopy(config or yaml.safe_load(DEFAULT_CONFIG.read_text()))
    doc["server"] = {**doc.get("server", {}), "listen": f"unix://{run_dir}/toolcell.sock",
                     "instance": f"docs-{uuid.uuid4().hex[:10]}", "shutdown_grace": "2s"}
    doc["audit"] = {"file": str(log_dir / "audit.jsonl"), "max_bytes": "2Ki", "keep": 50}
    doc["telemetry"] = {"service_name": "toolcell-docs-test"}
    doc.pop("auth", None)
    config_obj = parse_config(doc, environ={}, base_dir=root)
    async with serving(config_obj) as (_, client):
        for i in range(4):  # records for the audit trail (and its rotation)
            await client.call("text.wordcount", {"text": f"docs test {i}"}, timeout=60)
        yield run_dir, log_dir


RUNNABLE = [b for b in SHELL if any(c.skip is None and not c.synopsis for c in commands(b))]


@pytest.mark.docker
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
async def test_command_block_runs_as_written(block: Block, tmp_path: Path) -> None:
    engine()
    cmds = [c for c in commands(block) if c.skip is None and not c.synopsis]
    config = section_config(block)
    cwd = working_dir(tmp_path, config)
    needs_supervisor = any(SUPERVISED.search(c.text) for c in cmds) and not any(
        "toolcell serve" in c.text for c in cmds)
    async with contextlib.AsyncExitStack() as stack:
        dirs: tuple[Path | None, Path | None] = (None, None)
        if needs_supervisor:
            dirs = await stack.enter_async_context(supervisor(tmp_path, config))
        run = await asyncio.to_thread(run_sandboxed, tmp_path, cmds, cwd, *dirs)
    failed = {cmds[i].text: rc for i, rc in run.statuses.items() if rc != "0"}
    assert len(run.statuses) == len(cmds) and not failed, (
        f"{block.id}: failed {failed}, ran {len(run.statuses)} of {len(cmds)}\n"
        f"stdout: {run.stdout[-1500:]}\nstderr: {run.stderr[-2500:]}")
    shown = shown_output(block)
    missing = [line for line in shown if line.split()[0] not in run.stdout]
    assert not missing, f"{block.id}: output shown in the docs but not printed: {missing}\n{run.stdout[-1500:]}"


def shown_output(block: Block) -> list[str]:
    """The output lines a ``$ `` block shows (their first word must be in what the commands print)."""
    lines = block.text.splitlines()
    if not any(line.startswith("$ ") for line in lines):
        return []
    return [line for line in lines if line.strip() and not line.startswith(("$ ", "#"))]


# ---- configs: checked as serve would, on a reader's machine with the files they name -------------------

def site_files() -> dict[str, bytes]:
    """Files a config block names that a reader makes first (the mTLS example's certificates)."""
    ca = Pki()
    cert, key = ca.issue("toolcell.example", server=True)
    return {"/etc/toolcell/server.pem": cert, "/etc/toolcell/server-key.pem": key,
            "/etc/toolcell/clients-ca.pem": ca.ca_pem}


@pytest.mark.parametrize("block", config_blocks(), ids=lambda b: b.id)
def test_config_block_passes_profiles_check(block: Block, tmp_path: Path) -> None:
    config = tmp_path / "files" / "config.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(as_config(block), sort_keys=False))
    lines = []
    for i, (path, data) in enumerate(site_files().items()):
        (config.parent / str(i)).write_bytes(data)
        lines.append(f"mkdir -p {shlex.quote(os.path.dirname(path))} && "
                     f"install -m 0600 {config.parent / str(i)} {shlex.quote(path)}")
    check = Command(f"{' && '.join(lines)} && toolcell profiles check {config}", None, None, False)
    run = run_sandboxed(tmp_path, [check], working_dir(tmp_path, None), timeout=120)
    assert run.statuses == {0: "0"}, f"{block.id}: {run.stderr[-1500:]}"
    assert ": ok (" in run.stdout
