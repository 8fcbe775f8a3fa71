"""`python -m orchestrator.mcp`: serve the delegation tools over stdio for one worker."""

from orchestrator.mcp.server import main

if __name__ == "__main__":
    main()
