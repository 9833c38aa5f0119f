#!/usr/bin/env bash
# The README's main-job command: set up what is missing, start the supervisor on its default Unix
# socket with the built-in config, run example tools through gRPC in disposable containers, print
# their results and trace ids, then stop the supervisor. Then the same on the daemonless backend
# (TOOLCELL_ENGINE=oci: runc on unpacked root filesystems, no Docker socket), on its own socket.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
TOOLCELL="$REPO/.venv/bin/toolcell"
WORK="$(mktemp -d /tmp/toolcell-demo.XXXXXX)"
SERVER=""
stop() { if [[ -n "$SERVER" ]]; then kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null; fi; SERVER=""; }
trap 'stop; rm -rf "$WORK"' EXIT

serve() {  # serve ARGS...: start `toolcell serve ARGS` and wait until it says it serves
  local log="$WORK/serve-$#-$RANDOM.log"
  "$TOOLCELL" serve "$@" >"$log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 100); do
    grep -q "serving on" "$log" && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  grep "serving on" "$log" >&2
}

serve

echo; echo "\$ toolcell tools"
"$TOOLCELL" tools
echo; echo "\$ toolcell call text.wordcount --args '{\"text\": \"the quick brown fox\\njumps over the lazy dog\"}'"
"$TOOLCELL" call text.wordcount --args '{"text": "the quick brown fox\njumps over the lazy dog"}'
echo; echo "\$ toolcell call python.run --args '{\"code\": ...}' --json"
"$TOOLCELL" call python.run --json --args '{"code": "import os, platform, socket\nprint(\"uid\", os.getuid(), \"python\", platform.python_version())\nprint(\"interfaces\", [n for _, n in socket.if_nameindex()])\nfor path in (\"/tmp/scratch\", \"/pwned\"):\n    try:\n        open(path, \"w\").write(\"x\")\n        print(\"write\", path, \"ok\")\n    except OSError as e:\n        print(\"write\", path, e.strerror)"}'

echo; echo "--- the same tools on the daemonless oci engine (TOOLCELL_ENGINE=oci) ---"
stop
OCI_SOCK="unix://$WORK/toolcell.sock"
TOOLCELL_ENGINE=oci serve --listen "$OCI_SOCK"
echo; echo "\$ TOOLCELL_ENGINE=oci toolcell doctor"
TOOLCELL_ENGINE=oci "$TOOLCELL" doctor
echo; echo "\$ toolcell call text.wordcount --target $OCI_SOCK --args '{\"text\": \"no daemon, same sandbox\"}'"
"$TOOLCELL" call text.wordcount --target "$OCI_SOCK" --args '{"text": "no daemon, same sandbox"}'
echo; echo "\$ toolcell call python.run --target $OCI_SOCK --args '{\"code\": ...}' --json"
"$TOOLCELL" call python.run --target "$OCI_SOCK" --json --args '{"code": "import os, socket\nprint(\"uid\", os.getuid(), \"interfaces\", [n for _, n in socket.if_nameindex()])\ntry:\n    open(\"/pwned\", \"w\")\nexcept OSError as e:\n    print(\"write /pwned\", e.strerror)"}'

echo; echo "--- a stock MCP server, unmodified (mcp-server-time from PyPI, image built offline), one fresh sandbox per call ---"
stop
MCP_CONFIG="$WORK/with-servers.yaml"
MCP_SOCK="unix://$WORK/toolcell-mcp.sock"
cp runtime/data/default-config.yaml "$MCP_CONFIG"
cat >>"$MCP_CONFIG" <<'YAML'
servers:
  - name: time                                   # its tools appear as time.<tool>
    image: toolcell/mcp-time:latest              # toolcell images mcp --pypi mcp-server-time
    command: [/opt/mcp/bin/mcp-server-time, --local-timezone=UTC]
YAML
echo "\$ tail -4 $MCP_CONFIG"; tail -4 "$MCP_CONFIG"
serve --config "$MCP_CONFIG" --listen "$MCP_SOCK"
echo; echo "\$ toolcell tools --target $MCP_SOCK"
"$TOOLCELL" tools --target "$MCP_SOCK"
echo; echo "\$ toolcell call time.get_current_time --target $MCP_SOCK --args '{\"timezone\": \"Europe/Paris\"}'"
"$TOOLCELL" call time.get_current_time --target "$MCP_SOCK" --args '{"timezone": "Europe/Paris"}'
echo; echo "\$ toolcell call time.convert_time --target $MCP_SOCK --json --args '{...}'"
"$TOOLCELL" call time.convert_time --target "$MCP_SOCK" --json \
  --args '{"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}'
