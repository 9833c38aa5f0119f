"""MCP integration: serve the supervisor's sandboxed tools on an MCP server (official ``mcp`` SDK)."""

from toolcell.mcp.adapter import SandboxedTools, call_result, mcp_tool, server

__all__ = ["SandboxedTools", "call_result", "mcp_tool", "server"]
