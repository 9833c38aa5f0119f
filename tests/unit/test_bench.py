"""The bench's issue-15 pieces: the run-time probe, the OCI floor (real runc), the targets and the tables."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess  # nosec B404 - runs this interpreter on the bench's own probe code
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from toolcell import benchoci
from toolcell.backends.oci.cgroups import CgroupTree
from toolcell.bench import PYTHON_TOOL, TRIVIAL, TRIVIAL_ARGS, bench_config, summary
from toolcell.benchoci import OciFloor, parse_run_time, run_time_args
from toolcell.errors import ToolcellError

# A tool whose work after its input is known: it sleeps 50 ms once it has read its stdin.
SLOW_TOOL = [sys.executable, "-I", "-c",
             "import sys, time; d = sys.stdin.buffer.read(); time.sleep(0.05); print(len(d))"]


def test_run_time_probe_times_from_the_input_to_the_exit_of_a_tool_already_waiting_for_it() -> None:
    code = json.loads(run_time_args(SLOW_TOOL, TRIVIAL_ARGS, reps=3))["code"]
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, timeout=60, check=True)
    probe = parse_run_time(done.stdout.decode())
    assert len(probe.input_to_exit_s) == len(probe.spawn_to_exit_s) == 3
    # Seen blocked in read(0) before its input was written: the interpreter's start is not in the figure.
    assert probe.settled_in_read == 3
    for after_input, whole in zip(probe.input_to_exit_s, probe.spawn_to_exit_s, strict=True):
        assert 0.05 <= after_input < whole


def test_run_time_probe_output_that_is_not_the_probes_is_refused() -> None:
    with pytest.raises(RuntimeError, match="run-time probe"):
        parse_run_time("Traceback (most recent call last):\n")


def _require_oci_host() -> None:
    if os.geteuid() != 0 or shutil.which("runc") is None:
        pytest.fail("the OCI floor needs root and runc (scripts/setup.sh installs it)")
    try:
        benchoci.find_init()
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _floor(command: list[str], owner: str) -> OciFloor:
    config = bench_config("/nonexistent/s.sock", owner, 1, 1)
    spec = dataclasses.replace(config.compile(config.resolve("bench.cold"), "bench-floor"), command=tuple(command))
    try:
        return OciFloor(spec, runtime="runc", rootfs_dir=config.engine.oci_rootfs_dir, owner=owner)
    except ToolcellError as exc:  # e.g. the image's rootfs is missing: say how to make it
        pytest.fail(f"the OCI floor cannot start ({exc}); `toolcell images unpack` makes the bench image's rootfs")


def _leftovers(floor: OciFloor, owner: str) -> list[str]:
    left = [str(p) for p in Path(floor._tmp.name).iterdir() if p.name != "runc"]
    left += sorted(CgroupTree().orphans(owner))
    return left


def test_oci_floor_runs_the_tool_in_its_own_sandbox_and_leaves_nothing() -> None:
    _require_oci_host()
    owner = "bench-test-floor-" + os.urandom(3).hex()
    floor = _floor(TRIVIAL, owner)
    tmp = floor._tmp.name
    try:
        elapsed, out = floor.once(b"hello from the floor\n")
        assert out == b"hello from the floor\n"
        assert 0 < elapsed < benchoci.RUNC_TIMEOUT_S
        assert _leftovers(floor, owner) == []
    finally:
        floor.close()
    assert not os.path.exists(tmp)
    assert not any(d.exists() for d in CgroupTree().owner_dirs(owner))


def test_oci_floor_runs_the_python_tool_as_the_sandboxs_user() -> None:
    _require_oci_host()
    owner = "bench-test-floor-" + os.urandom(3).hex()
    code = "import os; print(os.getuid(), os.getgid(), open('/proc/1/cmdline').read())"
    floor = _floor(["python3", "-I", "-c", code], owner)
    try:
        _, out = floor.once(b"")
    finally:
        floor.close()
    uid, gid, init = out.decode().split(" ", 2)
    assert (int(uid), int(gid)) == floor.spec.uid_gid != (0, 0)
    assert init.startswith("/dev/init")  # the backend's init (tini) is pid 1, as in the backend's sandboxes


def test_oci_floor_failing_tool_is_an_error_and_leaves_nothing() -> None:
    _require_oci_host()
    owner = "bench-test-floor-" + os.urandom(3).hex()
    floor = _floor(["sh", "-c", "echo broken >&2; exit 3"], owner)
    try:
        with pytest.raises(RuntimeError, match="exited 3"):
            floor.once(b"")
        assert _leftovers(floor, owner) == []
    finally:
        floor.close()


def test_bench_config_for_the_oci_supervisor() -> None:
    with tempfile.TemporaryDirectory() as state:
        config = bench_config("/nonexistent/o.sock", "bench-x-oci", 4, 1,
                              engine={"kind": "oci", "oci": {"state_dir": state}}, throughput_pool=8)
    assert config.engine.kind == "oci"
    assert config.engine.oci_state_dir == state
    assert config.pools["bench.tp"].size == 8
    assert config.tools["bench.cold.python"].command == tuple(PYTHON_TOOL)
    assert "bench.tp" not in bench_config("/nonexistent/s.sock", "bench-x", 4, 1).tools


def _s(p50: float, per_s: float = math.nan, **extra: Any) -> dict[str, Any]:
    return {**summary([p50 / 1000] * 3), "per_s": per_s, **extra}


def _figures(oci: dict[str, Any]) -> dict[str, Any]:
    run_time = {"input_to_exit": _s(6.0), "spawn_to_exit": _s(20.0), "settled_in_read": 5, "reps": 5}
    return {
        "cold": _s(140.0), "raw_docker": _s(130.0), "raw_docker_network_none": _s(210.0),
        "warm": _s(2.5, warm_hits=3), "warm_python_tool": _s(8.5, warm_hits=3), "python_run_time": run_time,
        "throughput_rss": {"rss_base_mib": 70.0, "rss_peak_mib": 80.0}, "oci": oci,
    }


def _oci(cold_ms: float = 120.0, cold_per_s: float = 35.0, pool_per_s: float = 60.0, hits: int = 23) -> dict[str, Any]:
    run_time = {"input_to_exit": _s(6.0), "spawn_to_exit": _s(20.0), "settled_in_read": 5, "reps": 5}
    return {
        "runtime": "/usr/sbin/runc", "floor": _s(100.0), "cold": _s(cold_ms),
        "warm": _s(4.0, warm_hits=3), "warm_python_tool": _s(8.0, warm_hits=3), "python_run_time": run_time,
        "warm_python_tool_after_grace": _s(7.5, grace_s=0.3),
        "throughput": {"floor_c8": _s(200.0, 40.0, concurrency=8),
                       "cold_c8": _s(220.0, cold_per_s, concurrency=8, cpu_ms_per_call=38.0),
                       "pool_c8": _s(100.0, pool_per_s, concurrency=8, warm_hits=hits, cold_fallbacks=24 - hits,
                                     warm_share=hits / 24, refill_per_s=40.0, pool_size=8)},
        "throughput_rss": {"rss_base_mib": 80.0, "rss_peak_mib": 120.0},
    }


def test_issue15_targets_from_both_backends_figures() -> None:
    t = benchoci.targets(_figures(_oci()))
    met = {k: v["met"] for k, v in t.items()}
    assert met == {
        "docker_cold_p50_vs_raw_network_none": True,  # 140 / 210
        "docker_warm_cat_p50_ms": True,
        "docker_warm_python_p50_over_its_run_time_ms": True,  # 8.5 - 6.0
        "docker_rss_peak_under_throughput_mib": True,
        "oci_cold_p50_vs_floor": True,  # 1.2
        "oci_throughput_c8_cold_per_s": True,
        "oci_throughput_c8_pool8_per_s": True,
        "oci_throughput_c8_pool8_warm_share": True,  # 23 / 24
        "oci_warm_cat_p50_ms": False,  # 4 ms
        "oci_warm_python_p50_over_its_run_time_ms": True,
        "oci_rss_peak_under_throughput_mib": False,  # 120 MiB
    }
    assert t["oci_cold_p50_vs_floor"]["value"] == pytest.approx(1.2)
    assert t["docker_warm_python_p50_over_its_run_time_ms"]["value"] == pytest.approx(2.5)


@pytest.mark.parametrize(("oci", "missed"), [
    (_oci(cold_ms=131.0), "oci_cold_p50_vs_floor"),
    (_oci(cold_per_s=29.0), "oci_throughput_c8_cold_per_s"),
    (_oci(pool_per_s=49.0), "oci_throughput_c8_pool8_per_s"),
    (_oci(hits=21), "oci_throughput_c8_pool8_warm_share"),  # 87.5% warm
])
def test_each_oci_target_is_missed_just_past_its_limit(oci: dict[str, Any], missed: str) -> None:
    assert benchoci.targets(_figures(oci))[missed]["met"] is False


@pytest.mark.parametrize("oci", [{"skipped": "the OCI backend is not available: no module"},
                                 {"runtime": "runc", "error": "RuntimeError: OCI floor: runc run exited 1"}])
def test_an_oci_section_that_did_not_run_is_a_missed_target_naming_why(oci: dict[str, Any]) -> None:
    t = benchoci.targets(_figures(oci))
    assert t["oci_measured"]["met"] is False
    assert (oci.get("skipped") or oci["error"])[:40] in t["oci_measured"]["limit"]
    assert not any(k.startswith("oci_") and k != "oci_measured" for k in t)


def test_render_prints_a_table_per_backend_and_says_the_client_shares_the_process() -> None:
    lines: list[str] = []

    def row(name: str, s: dict[str, Any], extra: str = "") -> None:
        lines.append(f"{name} {s['p50_ms']:.2f}{extra}")

    benchoci.render_oci(_oci(), row, lines)
    text = "\n".join(lines)
    assert "OCI backend" in text
    for label in ("F floor", "1 cold through gRPC", "2 warm, trivial tool", "2b warm, Python tool",
                  "2b' the same, 0.3s after the refill",
                  "3 throughput floor c=8", "3 throughput cold  c=8", "3 throughput pool  c=8"):
        assert label in text
    assert "1.200x the floor" in text
    assert "96% warm" in text
    assert "CPU 38 ms/call; a fresh sandbox per call" in text
    assert "the supervisor and the bench's client share it" in text
    failed: list[str] = []
    benchoci.render_oci({"runtime": "runc", "error": "boom"}, row, failed)
    assert failed[-1] == "  FAILED: boom"

