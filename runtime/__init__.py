"""toolcell: run MCP tools in disposable, hardened sandboxes behind a gRPC supervisor."""

__version__ = "0.1.0"
