"""``toolcell bench``'s OCI sections: the daemonless backend beside its own floor, and both backends' warm path.

What is measured, side by side in the bench's one run (each figure a median of many samples; ratios of
figures taken interleaved, so a busy machine slows both sides alike):

- **floor**: the same sandbox with no supervisor. A bundle is written with the OCI backend's own code
  (``oci.bundle.oci_config`` over the ``RootfsStore``'s unpacked rootfs, ``policy.seccomp_oci``), its
  parent cgroups made and filled with the limits by ``oci.cgroups`` and ``runc run`` is a plain
  subprocess with the arguments on its stdin; timed end to end: cgroups, bundle, run, usage read,
  clean-up. The tool is the bench's Python tool (wordcount), so floor and cold run the same process.
- **cold through gRPC**: the same tool on a supervisor whose ``engine.kind`` is ``oci``: p50 / floor p50.
- **throughput**: a fresh sandbox per call at concurrency 8, the trivial tool (``cat``: what is
  measured is toolcell and the runtime, not the tool): cold, and with a pool of 8 (its hits and misses).
- **warm**, both backends (``Bench.warm_paths``): ``cat``'s p50 and the Python tool's p50 beside the
  Python tool's *own run time*, measured inside the sandbox (``RUN_TIME_CODE``): a pooled sandbox has
  spawned its tool before the claim, and the tool waits for its input; so what a warm call cannot avoid
  is the tool's time from its input to its exit. The probe, run as the bench's ``python.run``-style tool
  in the backend's own sandbox, spawns the tool as the launcher does, waits until it blocks reading its
  stdin (``/proc/<pid>/syscall``), then writes the arguments, closes stdin and times until the tool exited
  (``input_to_exit``); ``spawn_to_exit`` (the whole process, interpreter start included) is reported
  beside it. Target: warm p50 <= input_to_exit p50 + 3 ms, i.e. what toolcell and the backend add to a
  warm call. (The cold-minus-floor difference would be no run time: both start the same interpreter.)

``RssPeak`` samples this process's RSS (psutil) under each backend's throughput load, after garbage was
released (``release_garbage``): the supervisor *and the bench's own client* run in this one process, and
so does the other backend's stopped supervisor's code (both backends' modules stay imported).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import secrets
import shutil
import subprocess  # nosec B404 - runc, with fixed argument lists
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psutil

from toolcell.backends.oci.bundle import oci_config
from toolcell.backends.oci.cgroups import CgroupLimits, CgroupTree
from toolcell.backends.oci.rootfs import RootfsStore
from toolcell.errors import ToolcellError
from toolcell.policy.seccomp_oci import to_oci_seccomp
from toolcell.policy.spec import SandboxSpec, sandbox_pids

MiB: Final = 1024 * 1024
# The init runc starts as pid 1: static, so it needs nothing of the image's libraries.
INIT_CANDIDATES: Final = ("/usr/bin/tini-static", "/usr/local/bin/tini-static", "/usr/bin/tini")
RUNC_TIMEOUT_S: Final = 60.0
# The run-time probe waits (polling every ms, at most this long) until a freshly spawned tool blocks in
# read(0) (``/proc/<pid>/syscall``): the state a pooled tool is in when its claim arrives. Where that
# file can't tell, it waits the whole time (the figure then includes less of the interpreter's start).
SETTLE_MAX_S: Final = 2.0

# Runs inside the sandbox (the ``python.run`` tool): the tool's own run time, ``reps`` times, as JSON.
RUN_TIME_CODE: Final = """\
import json, platform, subprocess, time
argv = {argv!r}
stdin = {stdin!r}.encode()
read_nr = {{"x86_64": 0, "aarch64": 63}}.get(platform.machine(), -1)

def settle(pid):
    deadline = time.perf_counter() + {settle}
    while time.perf_counter() < deadline:
        try:
            with open("/proc/%d/syscall" % pid) as f:
                fields = f.read().split()
        except OSError:
            fields = []
        if len(fields) > 1 and fields[0] == str(read_nr) and int(fields[1], 16) == 0:
            return True
        time.sleep(0.001)
    return False

spawn, after_input, seen = [], [], 0
for _ in range({reps}):
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen += settle(p.pid)
    t1 = time.perf_counter()
    out, _ = p.communicate(stdin)
    t2 = time.perf_counter()
    assert p.returncode == 0 and out, (p.returncode, out)
    after_input.append(t2 - t1)
    spawn.append(t2 - t0)
print(json.dumps({{"input_to_exit_s": after_input, "spawn_to_exit_s": spawn, "settled_in_read": seen}}))
"""


def run_time_args(argv: list[str], stdin: str, reps: int) -> str:
    """Arguments for the ``python.run`` tool that measure ``argv``'s run time inside its sandbox."""
    return json.dumps({"code": RUN_TIME_CODE.format(argv=argv, stdin=stdin + "\n", reps=reps, settle=SETTLE_MAX_S)})


@dataclass(frozen=True)
class RunTime:
    """What the run-time probe measured inside the sandbox (seconds)."""

    input_to_exit_s: list[float]
    spawn_to_exit_s: list[float]  # the whole process, its wait for input (measured, not a sleep) included
    settled_in_read: int  # runs whose tool was seen blocked in read(0) before its input was written


def parse_run_time(stdout: str) -> RunTime:
    """The probe's JSON line (the last line of its output)."""
    try:
        doc = json.loads(stdout.strip().splitlines()[-1])
        return RunTime([float(x) for x in doc["input_to_exit_s"]], [float(x) for x in doc["spawn_to_exit_s"]],
                       int(doc["settled_in_read"]))
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise RuntimeError(f"run-time probe: unexpected output {stdout[-200:]!r}") from exc


def find_init() -> str:
    for path in INIT_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"no init for the OCI floor (looked for {', '.join(INIT_CANDIDATES)})")


class OciFloor:
    """One sandbox per ``once``, launched with no supervisor: the OCI backend's bundle and cgroup code
    and ``runc run`` as a plain subprocess (blocking; thread-safe: each call has its own id and bundle)."""

    def __init__(self, spec: SandboxSpec, *, runtime: str, rootfs_dir: str, owner: str,
                 cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.spec = spec
        self.runtime = shutil.which(runtime) or runtime
        self.rootfs_dir = rootfs_dir
        image = RootfsStore(rootfs_dir).get(spec.image)
        self._rootfs = str(image.rootfs)
        self._image = image.config
        self._seccomp = to_oci_seccomp(spec.seccomp_json)
        self._init = find_init()
        self._tree = CgroupTree(cgroup_root)
        self._owner = owner
        pids, _ = sandbox_pids(spec.isolation, spec.pids)
        self._limits = CgroupLimits(memory_bytes=spec.memory_bytes, pids=pids, cpus=spec.cpus)
        self._tmp = tempfile.TemporaryDirectory(prefix="toolcell-bench-oci-")
        self._state = os.path.join(self._tmp.name, "runc")
        os.makedirs(self._state, mode=0o700)

    def once(self, stdin: bytes) -> tuple[float, bytes]:
        """(seconds end to end, the tool's stdout) for one sandbox; RuntimeError if the tool failed."""
        sandbox_id = "floor-" + secrets.token_hex(6)
        t0 = time.perf_counter()
        cgroup = self._tree.sandbox(self._owner, sandbox_id)
        bundle = Path(self._tmp.name, sandbox_id)
        cgroup.create(self._limits)
        try:
            bundle.mkdir(mode=0o700)
            config = oci_config(self.spec, rootfs=self._rootfs, image=self._image, command=self.spec.command,
                                seccomp=self._seccomp, cgroups_path=self._tree.runc_path(self._owner, sandbox_id),
                                init_path=self._init)
            (bundle / "config.json").write_text(json.dumps(config))
            # The OCI backend's own invocation (its log, JSON), with plain pipes as the sandbox's stdio.
            done = subprocess.run(  # noqa: S603 # nosec B603 - fixed arguments, our own bundle
                [self.runtime, "--root", self._state, "--log", str(bundle / "runc.log"), "--log-format", "json",
                 "run", "--bundle", str(bundle), sandbox_id],
                input=stdin, capture_output=True, timeout=RUNC_TIMEOUT_S, check=False)
            cgroup.oom_kills()
            cgroup.sample()
        finally:
            cgroup.kill_all()
            cgroup.remove()
            shutil.rmtree(bundle, ignore_errors=True)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0 or not done.stdout:
            raise RuntimeError(f"OCI floor: {self.runtime} run exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-400:]}")
        return elapsed, done.stdout

    def close(self) -> None:
        """Remove whatever a failed run left (runc state, cgroups) and the bundles' directory."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            listed = subprocess.run(  # noqa: S603 # nosec B603
                [self.runtime, "--root", self._state, "list", "-q"], capture_output=True, timeout=30, check=False)
            for name in listed.stdout.decode().split():
                subprocess.run([self.runtime, "--root", self._state, "delete", "--force", name],  # noqa: S603 # nosec B603
                               capture_output=True, timeout=30, check=False)
        for sandbox_id in self._tree.orphans(self._owner):
            cgroup = self._tree.sandbox(self._owner, sandbox_id)
            cgroup.kill_all()
            cgroup.remove()
        for d in self._tree.owner_dirs(self._owner):
            with contextlib.suppress(OSError):
                d.rmdir()
        self._tmp.cleanup()


def release_garbage() -> None:
    """Collect garbage and hand the allocator's free pages back (glibc ``malloc_trim``), so that a later
    RSS figure is what is live then, not what an earlier section (a flood, 1 MiB hostile payloads) freed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """This process's peak RSS while the block runs (sampled every ``interval_s``); ``trim``: release
    garbage first (``release_garbage``), so the figure is the load's, not an earlier section's leftovers."""

    def __init__(self, interval_s: float = 0.005, *, trim: bool = False) -> None:
        if trim:
            release_garbage()
        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toolcell-bench-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def figures(self) -> dict[str, float]:
        return {"rss_base_mib": self.base / MiB, "rss_peak_mib": self.peak / MiB}


class CpuMeter:
    """CPU time of this process and of its reaped children while the block runs: with the OCI backend the
    sandboxes are our children (``runc run`` and, through it, the sandbox's processes), so this is what
    the calls cost the machine, whatever else runs on it. Approximate for a pool: a sandbox counts once
    it is reaped (at its removal, after its call), and a refill's launcher start once it is claimed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    @staticmethod
    def _now() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> CpuMeter:
        self._t0 = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._now() - self._t0

    def per_call_ms(self, calls: int) -> float:
        return self.seconds * 1000 / max(1, calls)


@dataclass(frozen=True)
class Check:
    """One target: a figure, its limit as text, met or not."""

    value: float
    limit: str
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "limit": self.limit, "met": self.met}


def oci_available(runtime: str = "runc") -> str:
    """"" when the OCI backend can run here, else why not (the bench then measures Docker only and says so;
    the ``oci_measured`` target is missed)."""
    try:
        from toolcell.backends.oci import OciBackend  # noqa: F401
    except (ImportError, ToolcellError) as exc:
        return f"the OCI backend is not available: {exc}"
    if shutil.which(runtime) is None:
        return f"the OCI runtime {runtime!r} is not installed"
    if os.geteuid() != 0:
        return "the OCI backend runs as root (it makes the sandboxes' cgroups); this bench is not root"
    return ""


# -- targets (issue 15) and the OCI table -------------------------------------------------------------

def _check(value: float, limit: str, met: bool) -> dict[str, Any]:
    return Check(value, limit, met).as_dict()


def _warm_targets(prefix: str, warm: dict[str, Any], warm_py: dict[str, Any], run_time: dict[str, Any],
                  rss: dict[str, Any]) -> dict[str, dict[str, Any]]:
    over = warm_py["p50_ms"] - run_time["input_to_exit"]["p50_ms"]
    return {
        f"{prefix}_warm_cat_p50_ms": _check(warm["p50_ms"], "<= 3", warm["p50_ms"] <= 3),
        f"{prefix}_warm_python_p50_over_its_run_time_ms": _check(
            over, f"<= 3 (p50 {warm_py['p50_ms']:.2f} vs run time {run_time['input_to_exit']['p50_ms']:.2f})",
            over <= 3),
        f"{prefix}_rss_peak_under_throughput_mib": _check(
            rss["rss_peak_mib"], "<= 100 (supervisor + the bench's client: one process)", rss["rss_peak_mib"] <= 100),
    }


def targets(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 15's targets: the Docker backend's (cold vs ``network_mode: none``, warm, RSS) and the OCI one's."""
    out: dict[str, dict[str, Any]] = {}
    if {"cold", "raw_docker_network_none", "warm", "python_run_time", "throughput_rss"} <= f.keys():
        ratio = f["cold"]["p50_ms"] / f["raw_docker_network_none"]["p50_ms"]
        out["docker_cold_p50_vs_raw_network_none"] = _check(ratio, "<= 0.7", ratio <= 0.7)
        out.update(_warm_targets("docker", f["warm"], f["warm_python_tool"], f["python_run_time"],
                                 f["throughput_rss"]))
    o = f.get("oci") or {}
    if "error" in o or "skipped" in o or "throughput" not in o:
        why = o.get("error") or o.get("skipped") or "not measured"
        out["oci_measured"] = _check(0.0, f"the OCI section ran ({why[:200]})", False)
        return out
    ratio = o["cold"]["p50_ms"] / o["floor"]["p50_ms"]
    out["oci_cold_p50_vs_floor"] = _check(ratio, "<= 1.3", ratio <= 1.3)
    t = o["throughput"]
    cold = next(v for k, v in t.items() if k.startswith("cold_c"))
    pool = next(v for k, v in t.items() if k.startswith("pool_c"))
    c = int(cold["concurrency"])
    out[f"oci_throughput_c{c}_cold_per_s"] = _check(cold["per_s"], ">= 30", cold["per_s"] >= 30)
    out[f"oci_throughput_c{c}_pool{pool['pool_size']}_per_s"] = _check(pool["per_s"], ">= 50", pool["per_s"] >= 50)
    out[f"oci_throughput_c{c}_pool{pool['pool_size']}_warm_share"] = _check(
        pool["warm_share"], ">= 0.90 of calls warm (pool hits / calls)", pool["warm_share"] >= 0.9)
    out.update(_warm_targets("oci", o["warm"], o["warm_python_tool"], o["python_run_time"], o["throughput_rss"]))
    return out


# The bench's table row: (name, summary, note after the figures).
Row = Callable[[str, dict[str, Any], str], None]


def run_time_line(r: dict[str, Any]) -> str:
    return (f"   the Python tool's own run time in the sandbox: input->exit p50 {r['input_to_exit']['p50_ms']:.2f} ms "
            f"(what a warm call cannot avoid), spawn->exit p50 {r['spawn_to_exit']['p50_ms']:.2f} ms, "
            f"{r['reps']} runs, {r['settled_in_read']} seen waiting in read(0) first")


def render_oci(o: dict[str, Any], row: Row, lines: list[str]) -> None:
    """The OCI backend's table (after the Docker one's)."""
    lines += ["", f"OCI backend (engine.kind oci: {o.get('runtime', 'runc')}, no daemon), a supervisor of its own"]
    if "skipped" in o:
        lines.append(f"  not measured: {o['skipped']}")
        return
    if "floor" in o:
        row("F floor: bundle+cgroups+runc, no sup.", o["floor"], "   (Python tool; our bundle/cgroup code)")
        row("1 cold through gRPC (Python tool)", o["cold"],
            f"   {o['cold']['p50_ms'] / o['floor']['p50_ms']:.3f}x the floor (interleaved)")
    if "warm" in o:
        row("2 warm, trivial tool (cat)", o["warm"], f"   warm hits {o['warm']['warm_hits']}/{int(o['warm']['n'])}")
        row("2b warm, Python tool (wordcount)", o["warm_python_tool"],
            f"   warm hits {o['warm_python_tool']['warm_hits']}/{int(o['warm_python_tool']['n'])}")
    if "warm_python_tool_after_grace" in o:
        g = o["warm_python_tool_after_grace"]
        row(f"2b' the same, {g['grace_s']:g}s after the refill", g, "   (readiness check)")
    if "python_run_time" in o:
        lines.append(run_time_line(o["python_run_time"]))
    for key, s in o.get("throughput", {}).items():
        kind, c = key.split("_c")
        notes = {"floor": "runc, no supervisor: the machine's own rate", "cold": "a fresh sandbox per call"}
        extra = notes.get(kind, "")
        if kind == "pool":
            extra = (f"pool of {s['pool_size']}: warm {s['warm_hits']}, cold fallback {s['cold_fallbacks']} "
                     f"({s['warm_share']:.0%} warm), refill {s['refill_per_s']:.1f}/s")
        if "cpu_ms_per_call" in s:
            extra = f"CPU {s['cpu_ms_per_call']:.0f} ms/call; " + extra
        extra = "   " + extra
        row(f"3 throughput {kind:5} c={c} (cat)", s, extra)
    if "throughput" in o:
        lines.append("   CPU/call: this process's and its reaped children's (runc, the sandboxes) CPU time per call")
    if "throughput_rss" in o:
        r = o["throughput_rss"]
        lines.append(f"   this process's RSS under the throughput load: peak {r['rss_peak_mib']:.1f} MiB "
                     f"(before {r['rss_base_mib']:.1f}); the supervisor and the bench's client share it")
    if "error" in o:
        lines.append(f"  FAILED: {o['error']}")
