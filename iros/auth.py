"""API keys: clients may call the model API; admins may also change settings under /api/*.

Keys are held only as SHA-256 digests, so a key never sits in memory, logs or API output in clear.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import orjson

from iros.config import AuthSettings, ConfigError, KeyEntry
from iros.errors import IrosError, bad

if TYPE_CHECKING:
    from starlette.requests import Request


class Role(IntEnum):
    CLIENT = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    requests_per_minute: float | None = None  # model API rate limit of this key; None: unlimited


OPEN = Principal("anonymous", Role.ADMIN)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        self.open = settings.open
        # Cookie sessions (the dashboard's login form) arrive as "Authorization: Session <token>",
        # put there by dashboard.SessionCookieMiddleware, which also sets this checker.
        self.sessions: Callable[[str], Principal | None] | None = None
        self._by_digest: dict[str, Principal] = {}
        for role, entries in ((Role.CLIENT, settings.api_keys), (Role.ADMIN, settings.admin_keys)):
            for i, entry in enumerate(entries):
                digest, name = self._resolve(entry, f"{role.name.lower()}-{i}")
                known = self._by_digest.get(digest)
                # A key listed as both keeps the stronger role.
                if known is None or known.role < role:
                    rate = entry.requests_per_minute or settings.requests_per_minute
                    self._by_digest[digest] = Principal(name, role, rate)

    @staticmethod
    def _resolve(entry: KeyEntry, default_name: str) -> tuple[str, str]:
        name = entry.name or default_name
        if entry.key_sha256:
            return entry.key_sha256.lower(), name
        if entry.key_env:
            value = os.environ.get(entry.key_env)
            if not value:
                raise ConfigError(f"auth key {name!r}: environment variable {entry.key_env} is not set")
            return _digest(value), name
        assert entry.key is not None
        return _digest(entry.key), name

    def find(self, key: str) -> tuple[str, Principal] | None:
        """The digest and principal of a key in clear (the login form), or None."""
        digest = _digest(key.strip())
        principal = self._by_digest.get(digest)
        return (digest, principal) if principal else None

    def digest_of(self, name: str) -> str | None:
        """The digest of the key named `name` (to check a session signed with it)."""
        return next((d for d, p in self._by_digest.items() if p.name == name), None)

    def authenticate(self, authorization: bytes | str | None, need: Role = Role.CLIENT) -> Principal:
        if self.open:
            return OPEN
        if not authorization:
            raise IrosError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="missing_api_key",
            )
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, key = authorization.partition(" ")
        principal = self._by_digest.get(_digest(key.strip())) if scheme.lower() == "bearer" else None
        if principal is None and scheme.lower() == "session" and self.sessions is not None:
            principal = self.sessions(key.strip())
        if principal is None:
            raise IrosError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        if principal.role < need:
            raise IrosError(
                403, "this endpoint needs an admin key", type="permission_error", code="admin_required"
            )
        return principal


class AdminAPI:
    """Base of the /api/* route classes: they hold the keyring, and most routes start with `_admin`.

    class CacheAPI(AdminAPI):
        def __init__(self, gateway, keyring): super().__init__(keyring); self.gateway = gateway
    """

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def _admin(self, request: Request) -> Principal:
        """The caller, if it holds the admin key; a 401/403 IrosError otherwise."""
        return self.keyring.authenticate(request.headers.get("authorization"), Role.ADMIN)

    async def _json_object(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object; anything else is a 400."""
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise bad("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        return body
