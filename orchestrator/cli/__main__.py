"""`python -m orchestrator.cli`: the console script without relying on PATH (demo uses it)."""

from orchestrator.cli.main import main

raise SystemExit(main())
