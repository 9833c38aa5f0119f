#!/usr/bin/env python3
"""Render the hostile suite's observations as the table in docs/security.md.

    pytest tests/security                       # writes build/security-observations.json
    python scripts/gen_security_table.py        # rewrites the table between the markers in docs/security.md
    python scripts/gen_security_table.py --check   # fails when the committed table differs

The observations are committed next to the doc (docs/security-observations.json) so the table can be
regenerated and checked without an engine; pass ``--from FILE`` to take a fresh run's file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "security.md"
COMMITTED = REPO / "docs" / "security-observations.json"
FRESH = REPO / "build" / "security-observations.json"
BEGIN = "<!-- BEGIN GENERATED TABLE (scripts/gen_security_table.py) -->"
END = "<!-- END GENERATED TABLE -->"
ORDER = ["network", "syscalls", "privilege", "filesystem", "resources", "output", "host", "lingering"]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("\t", " ")[:140]


def render(records: list[dict[str, object]]) -> str:
    rows: dict[tuple[str, str], dict[str, dict[str, object]]] = {}
    for r in records:
        key = (str(r["category"]), str(r["attack"]))
        rows.setdefault(key, {})[str(r["runtime"])] = r
    runtimes = sorted({str(r["runtime"]) for r in records})
    head = ["area", "attack", "layer that stops it (runc)", *[f"result under {rt}" for rt in runtimes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def sort_key(key: tuple[str, str]) -> tuple[int, str]:
        return (ORDER.index(key[0]) if key[0] in ORDER else len(ORDER), "")

    for key in sorted(rows, key=sort_key):
        by_rt = rows[key]
        layer = str((by_rt.get("runc") or next(iter(by_rt.values())))["layer"])
        results = []
        for rt in runtimes:
            r = by_rt.get(rt)
            if r is None:
                results.append("not run")
                continue
            mark = "held" if r["held"] else "**BREACH**"
            extra = f" ({r['layer']})" if rt != "runc" and r["layer"] != layer else ""
            results.append(f"{mark}: {cell(str(r['observed']))}{extra}")
        lines.append("| " + " | ".join([key[0], cell(key[1]), cell(layer), *[cell(x) for x in results]]) + " |")
    held = sum(1 for r in records if r["held"])
    lines.append("")
    lines.append(f"{len(rows)} attacks, {len(records)} observations, {held} held, {len(records) - held} breached.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, help=f"observations file (default {FRESH} if present)")
    ap.add_argument("--check", action="store_true", help="fail when docs/security.md is not current")
    args = ap.parse_args()
    source = args.source or (FRESH if FRESH.exists() and not args.check else COMMITTED)
    records = json.loads(source.read_text())
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"{DOC}: the table markers are missing", file=sys.stderr)
        return 1
    before, rest = doc.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{BEGIN}\n{render(records)}\n{END}{after}"
    if args.check:
        if new != doc:
            print(f"{DOC} is stale: run python scripts/gen_security_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    if source != COMMITTED:
        shutil.copyfile(source, COMMITTED)
    print(f"{DOC}: table from {source} ({len(records)} observations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
