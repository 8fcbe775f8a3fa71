"""The executor the settings choose: local processes, or actors on a Ray cluster."""

from __future__ import annotations

from orchestrator.core.config import Settings
from orchestrator.executors.local import LocalExecutor


def make_executor(settings: Settings) -> LocalExecutor:
    if settings.orchestrator_executor == "ray":
        try:
            from orchestrator.executors.ray_executor import RayExecutor
        except ImportError as exc:
            raise RuntimeError(
                f"ORCHESTRATOR_EXECUTOR=ray needs Ray: pip install 'parallel-ai-orchestrator[ray]' ({exc})"
            ) from None
        return RayExecutor.for_settings(settings)
    return LocalExecutor.for_settings(settings)
