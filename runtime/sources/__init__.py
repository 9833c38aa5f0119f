"""Tool sources: stock MCP servers run unmodified, one fresh sandbox per tool call.

An in-sandbox driver (``runtime/data/mcp_driver.py``) speaks MCP to the server over stdio and reports
frames, one JSON object per line, on the sandbox's stdout. Everything here treats those frames as
hostile: ``frames`` splits and parses them within bounds, ``result`` and ``catalog`` turn them into
scrubbed model values, ``discovery`` runs a server's ``tools/list`` in a sandbox at start-up and reload.
"""
