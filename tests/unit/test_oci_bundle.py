"""The OCI backend's pure parts: SandboxSpec -> config.json (``bundle.py``), and the per-sandbox cgroup
layout (``cgroups.py``) on fake v1 and v2 trees in a temporary directory."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from toolcell.backends.oci.bundle import (
    DEFAULT_PATH,
    INIT_PATH,
    MASKED_PATHS,
    READONLY_PATHS,
    ImageConfig,
    build_env,
    oci_config,
)
from toolcell.backends.oci.cgroups import CgroupLimits, CgroupTree, safe_component
from toolcell.errors import BackendError
from toolcell.policy.profile import Mount
from toolcell.policy.spec import Identity, SandboxSpec, Scratch

SECCOMP = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"], "syscalls": []}
IMAGE = ImageConfig(env=("PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "HOME=/root"), cmd=("python3",))


def spec(**changes: Any) -> SandboxSpec:
    base = SandboxSpec(
        image="toolcell/python:bookworm", command=("python3", "-c", "print(1)"), user="10001:10002",
        env={"A": "1"}, identity=Identity(owner="o", invocation_id="i", tool="t", profile="p"),
        isolation="runc", seccomp_json="{}", memory_bytes=128 << 20, cpus=1.0, pids=64, nofile=256,
        scratch=(Scratch("/tmp", 64 << 20),), mounts=(), timeout_s=10.0, kill_grace_s=1.0)
    return dataclasses.replace(base, **changes)


def config(s: SandboxSpec | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"rootfs": "/store/abc/rootfs", "image": IMAGE, "command": (s or spec()).command,
                            "seccomp": SECCOMP, "cgroups_path": "/toolcell/o/id/c", "init_path": "/usr/bin/tini-static"}
    args.update(kw)
    return oci_config(s or spec(), **args)


def mount(cfg: dict[str, Any], target: str) -> dict[str, Any]:
    found = [m for m in cfg["mounts"] if m["destination"] == target]
    assert len(found) == 1, f"{target}: {found}"
    only: dict[str, Any] = found[0]
    return only


# -- the table: one spec, one field of config.json, what it must be ------------------------------------

CASES: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("no capabilities at all", {}, lambda c: c["process"]["capabilities"],
     {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []}),
    ("no new privileges", {}, lambda c: c["process"]["noNewPrivileges"], True),
    ("read-only root", {}, lambda c: c["root"], {"path": "/store/abc/rootfs", "readonly": True}),
    ("namespaces, no user namespace", {}, lambda c: [n["type"] for n in c["linux"]["namespaces"]],
     ["pid", "network", "ipc", "uts", "mount", "cgroup"]),
    ("no namespace joined", {}, lambda c: [n for n in c["linux"]["namespaces"] if "path" in n], []),
    ("user and no supplementary groups", {}, lambda c: c["process"]["user"],
     {"uid": 10001, "gid": 10002, "additionalGids": []}),
    ("rlimits under runc", {}, lambda c: c["process"]["rlimits"],
     [{"type": "RLIMIT_NOFILE", "hard": 256, "soft": 256}, {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}]),
    ("rlimits under runsc: NPROC", {"isolation": "runsc", "pids": 16, "nofile": 99},
     lambda c: c["process"]["rlimits"],
     [{"type": "RLIMIT_NOFILE", "hard": 99, "soft": 99}, {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
      {"type": "RLIMIT_NPROC", "hard": 16, "soft": 16}]),
    ("/tmp tmpfs", {}, lambda c: mount(c, "/tmp"),
     {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
      "options": ["rw", "noexec", "nosuid", "nodev", f"size={64 << 20}", "mode=1777"]}),
    ("a secret's scratch: owner and mode",
     {"scratch": (Scratch("/tmp", 1 << 20), Scratch("/run/secrets", 4096, 0o700, 10001, 10002))},
     lambda c: mount(c, "/run/secrets")["options"],
     ["rw", "noexec", "nosuid", "nodev", "size=4096", "mode=700", "uid=10001", "gid=10002"]),
    ("masked paths as Docker", {}, lambda c: c["linux"]["maskedPaths"], list(MASKED_PATHS)),
    ("read-only paths as Docker", {}, lambda c: c["linux"]["readonlyPaths"], list(READONLY_PATHS)),
    ("no /dev/mqueue", {}, lambda c: [m for m in c["mounts"] if m["destination"] == "/dev/mqueue"], []),
    ("no /dev/shm unless asked", {}, lambda c: [m for m in c["mounts"] if m["destination"] == "/dev/shm"], []),
    ("/dev/shm when a scratch asks", {"scratch": (Scratch("/tmp", 1 << 20), Scratch("/dev/shm", 1 << 20))},
     lambda c: mount(c, "/dev/shm")["options"][:4], ["rw", "noexec", "nosuid", "nodev"]),
    ("/sys read-only", {}, lambda c: mount(c, "/sys")["options"], ["nosuid", "noexec", "nodev", "ro"]),
    ("/proc", {}, lambda c: mount(c, "/proc")["type"], "proc"),
    ("/dev tmpfs", {}, lambda c: mount(c, "/dev")["options"], ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    ("/dev/pts", {}, lambda c: mount(c, "/dev/pts")["options"],
     ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
    ("the init, read-only", {}, lambda c: mount(c, INIT_PATH),
     {"destination": INIT_PATH, "type": "bind", "source": "/usr/bin/tini-static",
      "options": ["bind", "ro", "nosuid", "nodev"]}),
    ("host mounts read-only", {"mounts": (Mount(source="/srv/data", target="/data"),)},
     lambda c: mount(c, "/data"),
     {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro", "nosuid", "nodev"]}),
    ("the init runs the command", {}, lambda c: c["process"]["args"], [INIT_PATH, "--", "python3", "-c", "print(1)"]),
    ("cgroupsPath under our parent", {}, lambda c: c["linux"]["cgroupsPath"], "/toolcell/o/id/c"),
    ("runc's cgroup: a backstop just above the parent's limits", {"memory_bytes": 64 << 20, "cpus": 0.5},
     lambda c: {k: v for k, v in c["linux"]["resources"].items() if k != "devices"},
     {"memory": {"limit": (64 + 16) << 20, "swap": (64 + 16) << 20}, "pids": {"limit": 64},
      "cpu": {"quota": 50000, "period": 100000}}),
    ("backstop pids under runsc: the Sentry's allowance", {"isolation": "runsc", "pids": 16},
     lambda c: c["linux"]["resources"]["pids"], {"limit": 64 + 8 * 16}),
    ("no CPU quota when cpus is 0", {"cpus": 0.0}, lambda c: "cpu" in c["linux"]["resources"], False),
    ("devices: deny all first", {}, lambda c: c["linux"]["resources"]["devices"], [{"allow": False, "access": "rwm"}]),
    ("hostname", {"hostname": "box"}, lambda c: c["hostname"], "box"),
    ("cwd", {"working_dir": "/tmp/work"}, lambda c: c["process"]["cwd"], "/tmp/work"),
    ("no terminal", {}, lambda c: c["process"]["terminal"], False),
    ("seccomp as given", {}, lambda c: c["linux"]["seccomp"], SECCOMP),
    ("env: image, then spec, HOME kept from the image", {"env": {"A": "1", "LANG": "C"}},
     lambda c: c["process"]["env"],
     ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C", "HOME=/root", "HOSTNAME=sandbox", "A=1"]),
]


@pytest.mark.parametrize(("what", "changes", "field", "expected"), CASES, ids=[c[0] for c in CASES])
def test_spec_to_config(what: str, changes: dict[str, Any], field: Any, expected: Any) -> None:
    assert field(config(spec(**changes))) == expected


def test_no_swap_limit_where_the_host_accounts_no_swap() -> None:
    assert config(swap_limit=False)["linux"]["resources"]["memory"] == {"limit": (128 + 16) << 20}


def test_scratch_parents_mount_before_children() -> None:
    s = spec(scratch=(Scratch("/tmp/a/b", 4096), Scratch("/tmp", 8192), Scratch("/tmp/a", 4096)))
    order = [m["destination"] for m in config(s)["mounts"]
             if m["type"] == "tmpfs" and m["destination"].startswith("/tmp")]
    assert order == ["/tmp", "/tmp/a", "/tmp/a/b"]


def test_mounts_after_the_sandbox_filesystems() -> None:
    order = [m["destination"] for m in config(spec(mounts=(Mount("/srv", "/opt/data"),)))["mounts"]]
    assert order == ["/proc", "/dev", "/dev/pts", "/sys", "/tmp", "/opt/data", INIT_PATH]


def test_etc_files_are_bound_read_only_before_the_init() -> None:
    cfg = config(etc_files=(("/etc/hosts", "/state/etc/hosts"), ("/etc/hostname", "/state/etc/hostname-sandbox")))
    assert [m["destination"] for m in cfg["mounts"]][-3:] == ["/etc/hosts", "/etc/hostname", INIT_PATH]
    assert mount(cfg, "/etc/hosts") == {"destination": "/etc/hosts", "type": "bind", "source": "/state/etc/hosts",
                                        "options": ["bind", "ro", "nosuid", "nodev", "noexec"]}


def test_a_prepared_network_namespace_is_joined() -> None:
    namespaces = config(netns_path="/proc/1/fd/9")["linux"]["namespaces"]
    assert {"type": "network", "path": "/proc/1/fd/9"} in namespaces


def test_image_entrypoint_comes_before_the_command() -> None:
    cfg = config(image=ImageConfig(entrypoint=("/entry", "x")))
    assert cfg["process"]["args"] == [INIT_PATH, "--", "/entry", "x", "python3", "-c", "print(1)"]


@pytest.mark.parametrize(("image_env", "spec_env", "expected"), [
    ((), {}, [f"PATH={DEFAULT_PATH}", "HOSTNAME=h", "HOME=/tmp"]),
    (("PATH=/bin", "X=1", "junk"), {"X": "2"}, ["PATH=/bin", "X=2", "HOSTNAME=h", "HOME=/tmp"]),
    ((), {"HOME": "/home/x", "PATH": "/p"}, ["PATH=/p", "HOSTNAME=h", "HOME=/home/x"]),
    (("A=b=c",), {}, ["A=b=c", f"PATH={DEFAULT_PATH}", "HOSTNAME=h", "HOME=/tmp"]),
])
def test_env_merge(image_env: tuple[str, ...], spec_env: dict[str, str], expected: list[str]) -> None:
    assert build_env(image_env, spec_env, "h") == expected


@pytest.mark.parametrize(("changes", "kw", "message"), [
    ({"user": "0:0"}, {}, "uid 0"),
    ({"user": "root"}, {}, "numeric"),
    ({"user": "10001:-1"}, {}, "uid 10001"),
    ({"scratch": (Scratch("tmp", 4096),)}, {}, "absolute"),
    ({"scratch": (Scratch("/tmp", 0),)}, {}, "no size cap"),
    ({"mounts": (Mount("relative", "/data"),)}, {}, "absolute"),
    ({"mounts": (Mount("/srv", "/tmp"),)}, {}, "cover"),
    ({"mounts": (Mount("/srv", "/"),)}, {}, "cover"),
    ({"mounts": (Mount("/srv", "/proc"),)}, {}, "cover"),
    ({"mounts": (Mount("/srv", INIT_PATH),)}, {}, "cover"),
    ({"working_dir": "tmp"}, {}, "absolute"),
    ({"env": {"A=B": "1"}}, {}, "environment"),
    ({"env": {"A": "x\0y"}}, {}, "environment"),
    ({}, {"seccomp": {}}, "seccomp"),
    ({}, {"command": ()}, "no command"),
    ({"memory_bytes": 0}, {}, "memory and a pids limit"),
    ({"pids": 0}, {}, "memory and a pids limit"),
])
def test_refusals(changes: dict[str, Any], kw: dict[str, Any], message: str) -> None:
    with pytest.raises(BackendError, match=message):
        config(spec(**changes), **kw)


# -- cgroups: paths and files on fake trees ---------------------------------------------------------------

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "cpuset", "devices", "freezer", "blkio", "systemd")


def fake_v1(root: Path) -> Path:
    for ctrl in V1_CONTROLLERS:
        (root / ctrl).mkdir(parents=True)
    return root


def fake_v2(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v1_layout(tmp_path: Path) -> None:
    tree = CgroupTree(fake_v1(tmp_path))
    assert not tree.v2
    assert tree.runc_path("owner-1", "tc-x") == "/toolcell/owner-1/tc-x/c"
    cg = tree.sandbox("owner-1", "tc-x")
    # A real cgroupfs makes the control files itself; on the fake they are missing, so writing the limits
    # fails: an error, and nothing is left behind.
    with pytest.raises(BackendError, match="cannot create"):
        cg.create(CgroupLimits(memory_bytes=1 << 20, pids=10, cpus=0.5))
    assert not any((tmp_path / c / "toolcell" / "owner-1" / "tc-x").exists() for c in V1_CONTROLLERS)
    assert cg.memory_dir == tmp_path / "memory/toolcell/owner-1/tc-x"
    assert cg.pids_dir == tmp_path / "pids/toolcell/owner-1/tc-x"
    assert cg.cpuacct_dir == tmp_path / "cpuacct/toolcell/owner-1/tc-x"
    assert sorted(cg.dirs()) == sorted(tmp_path / c / "toolcell/owner-1/tc-x" for c in V1_CONTROLLERS)


def test_v1_limits_usage_and_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = CgroupTree(fake_v1(tmp_path))
    cg = tree.sandbox("o", "tc-y")
    real_mkdir = Path.mkdir

    def mkdir_with_files(self: Path, *args: Any, **kwargs: Any) -> None:
        real_mkdir(self, *args, **kwargs)
        ctrl = self.relative_to(tmp_path).parts[0]
        names = {"memory": ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.swappiness"],
                 "pids": ["pids.max"], "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us"], "cpuacct": []}[ctrl]
        for name in names:
            (self / name).write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    monkeypatch.setattr(type(cg), "_watch_oom_v1", lambda self: None)  # eventfds need a real cgroupfs
    cg.create(CgroupLimits(memory_bytes=32 << 20, pids=20, cpus=1.5))
    monkeypatch.undo()
    assert (cg.memory_dir / "memory.limit_in_bytes").read_text() == str(32 << 20)
    assert (cg.memory_dir / "memory.memsw.limit_in_bytes").read_text() == str(32 << 20)  # no swap escape
    assert (cg.memory_dir / "memory.swappiness").read_text() == ""  # memsw present: swappiness untouched
    assert (cg.pids_dir / "pids.max").read_text() == "20"
    assert (cg.cpu_dir / "cpu.cfs_period_us").read_text() == "100000"
    assert (cg.cpu_dir / "cpu.cfs_quota_us").read_text() == "150000"
    (cg.memory_dir / "memory.max_usage_in_bytes").write_text("12345\n")
    (cg.cpuacct_dir / "cpuacct.usage").write_text("999\n")
    (cg.memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    usage = cg.sample()
    assert (usage.peak_memory_bytes, usage.cpu_time_ns) == (12345, 999)
    assert cg.oom_kills() == 2
    assert tree.orphans("o") == {"tc-y"}
    # What runc leaves in other controllers goes too (a real cgroupfs has no regular files to remove).
    for d in cg.dirs():
        for f in list(d.iterdir()) if d.exists() else []:
            f.unlink()
    (tmp_path / "devices/toolcell/o/tc-y/c").mkdir(parents=True)
    assert cg.remove()
    assert tree.orphans("o") == set()
    assert (tmp_path / "memory/toolcell/o").is_dir()  # the owner's directory stays for its next sandbox


def test_v2_layout_and_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_v2(tmp_path / "cg")
    tree = CgroupTree(root)
    assert tree.v2
    cg = tree.sandbox("own", "tc-z")
    assert cg.memory_dir == cg.pids_dir == cg.cpu_dir == root / "toolcell/own/tc-z"
    assert tree.runc_path("own", "tc-z") == "/toolcell/own/tc-z/c"
    real_mkdir = Path.mkdir

    def mkdir_with_files(self: Path, *args: Any, **kwargs: Any) -> None:
        real_mkdir(self, *args, **kwargs)
        for name in ("cgroup.subtree_control", "memory.max", "memory.swap.max", "pids.max", "cpu.max"):
            (self / name).write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    cg.create(CgroupLimits(memory_bytes=64 << 20, pids=8, cpus=0.25))
    monkeypatch.undo()
    d = cg.memory_dir
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "memory.swap.max").read_text() == "0"  # swap alone: memory + swap stays at memory.max
    assert (d / "pids.max").read_text() == "8"
    assert (d / "cpu.max").read_text() == "25000 100000"
    for parent in (root, root / "toolcell", root / "toolcell/own", d):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "memory.peak").write_text("4096\n")
    (d / "cpu.stat").write_text("usage_usec 7\nuser_usec 5\n")
    assert cg.oom_kills() == 1
    usage = cg.sample()
    assert (usage.peak_memory_bytes, usage.cpu_time_ns) == (4096, 7000)
    assert cg.dirs() == [d]


def test_v2_without_memory_peak_tracks_current(tmp_path: Path) -> None:
    tree = CgroupTree(fake_v2(tmp_path / "cg"))
    cg = tree.sandbox("own", "tc-q")
    cg.memory_dir.mkdir(parents=True)
    (cg.memory_dir / "memory.current").write_text("100\n")
    assert cg.sample().peak_memory_bytes == 100
    (cg.memory_dir / "memory.current").write_text("50\n")
    assert cg.sample().peak_memory_bytes == 100  # the highest sample is kept


def test_v1_missing_controller_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "memory").mkdir()
    with pytest.raises(BackendError, match="pids"):
        CgroupTree(tmp_path)


@pytest.mark.parametrize(("owner", "safe"), [
    ("test-abc-1", True), ("host.example_1", True), ("..", False), ("a/b", False), ("", False),
    ("x" * 65, False), ("é", False),
])
def test_owner_names_become_one_path_component(owner: str, safe: bool) -> None:
    component = safe_component(owner)
    assert (component == owner) is safe
    assert "/" not in component and component not in ("", ".", "..") and os.sep not in component


# -- the rootfs store: checked extraction of a plain rootfs tarball ----------------------------------------

def _tar(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """A tarball of (name, kind, data-or-link) members: kind is file, dir, symlink, hardlink, chardev."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o4755 if kind == "suid" else 0o644
            if kind in ("file", "suid"):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chardev": tarfile.CHRTYPE}[kind]
            info.linkname = data
            tar.addfile(info)
    return path


def test_unpack_tar_keeps_files_links_and_config(tmp_path: Path) -> None:
    from toolcell.backends.oci.rootfs import RootfsStore

    tarball = _tar(tmp_path / "rootfs.tar", [
        ("etc", "dir", ""), ("etc/os-release", "file", "ID=test\n"), ("bin", "dir", ""),
        ("bin/tool", "suid", "#!/bin/sh\n"), ("etc/alternatives", "symlink", "/usr/bin/x"),
        ("etc/copy", "hardlink", "etc/os-release"), ("dev", "dir", ""), ("dev/null", "chardev", ""),
    ])
    store = RootfsStore(tmp_path / "store")
    digest = store.unpack_tar(tarball, "test/rootfs", ImageConfig(env=("A=1",), working_dir="/w"))
    assert digest.startswith("sha256:")
    found = store.lookup("test/rootfs:latest")
    assert found is not None and store.has_image("test/rootfs") and store.has_image(digest)
    assert (found.rootfs / "etc/os-release").read_text() == "ID=test\n"
    assert os.readlink(found.rootfs / "etc/alternatives") == "/usr/bin/x"  # absolute: resolved in the sandbox
    assert (found.rootfs / "etc/copy").stat().st_ino == (found.rootfs / "etc/os-release").stat().st_ino
    assert (found.rootfs / "bin/tool").stat().st_mode & 0o7777 == 0o755  # set-id bits cleared
    assert not (found.rootfs / "dev/null").exists()  # device nodes are never created
    assert found.config.env == ("A=1",) and found.config.working_dir == "/w"
    store.remove("test/rootfs")
    assert not store.has_image("test/rootfs") and not (tmp_path / "store" / digest.split(":")[1]).exists()


@pytest.mark.parametrize("members", [
    [("/etc/passwd", "file", "x")],
    [("../escape", "file", "x")],
    [("a/../../escape", "file", "x")],
    [("link", "symlink", "/"), ("link/escape", "file", "x")],
    [("link", "symlink", "../.."), ("link/escape", "file", "x")],
    [("hard", "hardlink", "/etc/shadow")],
    [("hard", "hardlink", "../outside")],
], ids=["absolute", "dotdot", "nested-dotdot", "through-absolute-symlink", "through-relative-symlink",
        "hardlink-absolute", "hardlink-dotdot"])
def test_unpack_tar_refuses_escapes(tmp_path: Path, members: list[tuple[str, str, str]]) -> None:
    from toolcell.backends.oci.rootfs import RootfsStore

    store = RootfsStore(tmp_path / "store")
    with pytest.raises(BackendError, match="refusing"):
        store.unpack_tar(_tar(tmp_path / "evil.tar", members), "evil")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "store" / "escape").exists()
    assert not store.has_image("evil")
    assert [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".unpack-")] == []
