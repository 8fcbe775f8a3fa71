"""Tiny stdio MCP server for harness tests (official ``mcp`` SDK >= 2.3: FastMCP is now MCPServer).

Tool ``echo(text)``: returns ``"echo: <text>"`` as plain text and, when ``ECHO_MCP_MARKER`` names a
file, appends ``<text>\\n`` to it, so a test can prove the tool really ran in this process.

Run: ``python tests/fakes/echo_mcp_server.py`` (speaks MCP over stdin/stdout).
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("echo")


# structured_output=False: plain text result, so Claude Code forwards "echo: ..." (not {"result": ...}).
@server.tool(structured_output=False)
def echo(text: str) -> str:
    """Echo the given text back, prefixed with 'echo: '."""
    marker = os.environ.get("ECHO_MCP_MARKER")
    if marker:
        with open(marker, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return f"echo: {text}"


if __name__ == "__main__":
    server.run("stdio")
