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
mypy runtime
step "bandit"
bandit -q -c pyproject.toml -r runtime
step "pytest (unit, integration, security and fault tests against the real engine)"
pytest -q -p no:cacheprovider -m "not engine_restart" "$@"
# Restarting the engine disturbs everything else using it: last, on its own (runs when CI=true, or when
# TOOLCELL_ALLOW_ENGINE_RESTART=1; skipped otherwise).
step "pytest: engine restart mid-run"
pytest -q -p no:cacheprovider -m engine_restart -rs tests/faults
