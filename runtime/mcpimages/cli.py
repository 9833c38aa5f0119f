"""``toolcell images mcp``: build the requested server images, unpack them for the oci engine, report.

The report names what a ``servers:`` entry needs: the image and the command inside it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from toolcell.errors import ConfigError
from toolcell.mcpimages.build import HostTools, McpImage, build_image
from toolcell.mcpimages.spec import McpImageRequest, parse_server_list, request
from toolcell.quoting import quote

_MAX_LIST_BYTES = 1 << 20


def requests_from(*, pypi: str | None, npm: str | None, from_file: str | None, name: str | None,
                  command: str | None) -> tuple[McpImageRequest, ...]:
    """The requests the command line names: one package, or every line of a servers list."""
    if from_file is not None:
        if name is not None or command is not None:
            raise ConfigError("--name and --command apply to one package; a servers list names them per line",
                              key="images mcp")
        path = Path(from_file)
        try:
            if path.stat().st_size > _MAX_LIST_BYTES:
                raise ConfigError(f"{path} is larger than {_MAX_LIST_BYTES} bytes", key="images mcp")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"can't read the servers list {quote(str(path), 200)}: {exc}", key="images mcp") from exc
        return parse_server_list(text, origin=str(path))
    if pypi is not None:
        return (request("pypi", pypi, name, command),)
    if npm is not None:
        return (request("npm", npm, name, command),)
    raise ConfigError("give --pypi PACKAGE, --npm PACKAGE or --from FILE", key="images mcp")


def run(*, pypi: str | None = None, npm: str | None = None, from_file: str | None = None,
        name: str | None = None, command: str | None = None, force: bool = False, store: str | None = None,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Build each request (ConfigError/BackendError propagate: the CLI turns them into exit 3); 0 when done."""
    requests = requests_from(pypi=pypi, npm=npm, from_file=from_file, name=name, command=command)
    tools = HostTools.discover()

    def log(line: str) -> None:
        print(f"images: {line}", file=err, flush=True)

    for req in requests:
        built = build_image(req, tools, force=force, log=log)
        rootfs = _unpack(built, store) if store else None
        report(built, req.name, rootfs, store, out)
    return 0


def _unpack(built: McpImage, store: str) -> str:
    from toolcell.backends.oci.rootfs import RootfsStore

    rootfs = RootfsStore(store)
    digest = rootfs.unpack_docker_image(built.image)
    rootfs.unpack_docker_image(built.latest)  # present by now: only indexes the :latest name
    return digest


def report(built: McpImage, name: str, rootfs: str | None, store: str | None, out: TextIO) -> None:
    """Image, state and time, size, package, rootfs, and the ``servers:`` entry to paste."""
    print(f"{built.image} {built.state} in {built.seconds:.1f} s (also {built.latest})", file=out)
    print(f"  package  {built.package}", file=out)
    print(f"  size     {built.size / 1e6:.1f} MB", file=out)
    if rootfs is not None:
        print(f"  rootfs   {rootfs} in {store}", file=out)
    print("  servers: entry:", file=out)
    print(f"    - name: {name}", file=out)
    print(f"      image: {built.latest}", file=out)
    print(f"      command: [{built.command}]", file=out)
