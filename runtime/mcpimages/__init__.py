"""Images for stock MCP servers published on PyPI or npm: ``toolcell/mcp-<name>:<version>`` and ``:latest``.

Packages are fetched on the host (wheels only for PyPI; ``npm install --ignore-scripts`` for npm) into a
build context; ``docker build --network none`` then installs them on ``toolcell/python:bookworm`` with the
runner image's hardening (root-owned read-only files, byte-compiled, no set-id bits, user 10001, no
entrypoint). ``/opt/mcp/bin/<executable>`` is what a ``servers:`` entry runs; ``/opt/mcp/inputs.txt``
records every input. Modules, from pure to I/O:

    spec.py      the request: package specs, image names (strict; pure)
    context.py   Dockerfiles, wrappers, inputs record, hashes (pure)
    process.py   run one host command with its output in a log file
    fetch.py     pip download / npm install on the host
    build.py     docker build / tag / inspect, the skips by label
    cli.py       ``toolcell images mcp``: build, unpack for the oci engine, report
"""

from toolcell.mcpimages.build import HostTools, McpImage, build_image
from toolcell.mcpimages.spec import McpImageRequest, McpPackage, parse_package, parse_server_list, request

__all__ = ["HostTools", "McpImage", "McpImageRequest", "McpPackage", "build_image", "parse_package",
           "parse_server_list", "request"]
