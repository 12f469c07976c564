"""Which deployment serves a request: every configured entry of a model name is one deployment of it.

router = Router(settings.models)
for deployment in router.candidates("gpt-test"):   # rotated per request, so load spreads
    ...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from iros.backends import build_backend
from iros.config import ModelSettings
from iros.errors import IrosError
from iros.types import Backend


@dataclass(slots=True)
class Deployment:
    name: str  # the model name clients use
    index: int  # position among that model's deployments
    settings: ModelSettings
    backend: Backend

    @property
    def label(self) -> str:
        return f"{self.name}#{self.index}"


class Router:
    def __init__(
        self, models: Sequence[ModelSettings], factory: Callable[[ModelSettings], Backend] = build_backend
    ) -> None:
        self.deployments: dict[str, list[Deployment]] = {}
        for m in models:
            group = self.deployments.setdefault(m.name, [])
            group.append(Deployment(m.name, len(group), m, factory(m)))
        self._turns = {name: itertools.count() for name in self.deployments}

    @property
    def names(self) -> list[str]:
        return list(self.deployments)

    def all(self) -> Iterator[Deployment]:
        for group in self.deployments.values():
            yield from group

    def candidates(self, model: str) -> list[Deployment]:
        group = self.deployments.get(model)
        if group is None:
            raise IrosError(
                404,
                f"the model {model!r} does not exist; GET /v1/models lists the models served",
                param="model",
                code="model_not_found",
            )
        if len(group) == 1:
            return group
        start = next(self._turns[model]) % len(group)
        return group[start:] + group[:start]

    async def aclose(self) -> None:
        for d in self.all():
            await d.backend.aclose()
