#!/usr/bin/env bash
# The README's test command: set up what is missing (engine, images, venv), then lint, type-check,
# security-scan and run every test against the real Docker engine.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
step() { printf '\n== %s\n' "$*" >&2; }

step "generated protobuf code is current"
python scripts/gen_protos.py --check
step "docs/security.md table matches docs/security-observations.json"
python scripts/gen_security_table.py --check
step "ruff"
ruff check runtime tests scripts
step "mypy --strict runtime/"
mypy
step "bandit"
bandit -q -c pyproject.toml -r runtime
step "toolcell bench --quick (smoke check: it must complete and print its table; targets need the full run)"
bench_json="$(mktemp --suffix=.json)"
toolcell bench --quick --json "$bench_json"
python - "$bench_json" <<'EOF'
import json, sys
figures = json.load(open(sys.argv[1]))
missing = {"noop_grpc", "raw_docker", "raw_docker_network_none", "cold", "warm", "throughput", "flood", "hostile",
           "oci", "targets", "mcp", "sessions"} - set(figures)
assert not missing, f"bench JSON lacks {missing}"
oci = figures["oci"]
assert "skipped" not in oci and {"floor", "cold", "warm", "throughput"} <= set(oci), f"the oci section did not run: {oci}"
assert oci["warm"]["n"] > 0 and oci["cold"]["n"] > 0, "no oci call was measured"
assert figures["warm"]["warm_hits"] > 0, "no call was served warm"
assert figures["hostile"]["attack"]["warm"]["n"] > 0, "no normal call was served under attack"
for engine in ("docker", "oci"):  # the stock MCP servers the set-up builds, cold and warm on both engines
    servers = figures["mcp"]["engines"][engine]["servers"]
    assert {"time", "fetch", "everything"} <= set(servers), f"mcp bench on {engine}: {sorted(servers)}"
    for name, row in servers.items():
        assert "error" not in row and row["cold"]["n"] > 0 and row["warm"]["n"] > 0, f"mcp {engine} {name}: {row}"
for engine, row in figures["sessions"]["engines"].items():  # a session call beside a warm one-shot, both engines
    assert "error" not in row and "skipped" not in row and row["session"]["n"] > 0, f"sessions {engine}: {row}"
EOF
rm -f "$bench_json"
# Restarting the engine disturbs everything else using it: on its own, nothing else running (runs when
# CI=true, or when TOOLCELL_ALLOW_ENGINE_RESTART=1; skipped otherwise).
step "pytest: engine restart mid-run"
pytest -q -p no:cacheprovider -m engine_restart -rs tests/faults
# The whole suite last, so its summary is the run's closing line.
step "pytest (unit, integration, security and fault tests against the real engine)"
pytest -q -p no:cacheprovider -m "not engine_restart" "$@"
