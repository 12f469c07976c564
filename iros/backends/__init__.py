"""Backends: one per kind of model server, each implementing iros.backends.base.Backend."""

from __future__ import annotations

from iros.backends.base import Backend
from iros.config import ModelSettings


def build_backend(settings: ModelSettings) -> Backend:
    if settings.backend == "simulated":
        from iros.backends.simulated import SimulatedBackend
        from iros.backends.simulation import PROFILES

        return SimulatedBackend(
            PROFILES[settings.profile], settings.target_model, read_timeout=settings.timeouts.read_seconds
        )
    from iros.backends.openai import OpenAIBackend

    return OpenAIBackend(settings)


__all__ = ["build_backend"]
