"""The orchestrator's delegation tools for agents, as a stdio MCP server (`python -m orchestrator.mcp`)."""
