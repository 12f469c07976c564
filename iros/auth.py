"""API keys: clients may call the model API; admins may also change settings under /api/*.

Keys are held only as SHA-256 digests, so a key never sits in memory, logs or API output in clear.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from enum import IntEnum

from iros.config import AuthSettings, ConfigError, KeyEntry
from iros.errors import IrosError


class Role(IntEnum):
    CLIENT = 1
    ADMIN = 2


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role


OPEN = Principal("anonymous", Role.ADMIN)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, settings: AuthSettings) -> None:
        self.open = settings.open
        self._by_digest: dict[str, Principal] = {}
        for role, entries in ((Role.CLIENT, settings.api_keys), (Role.ADMIN, settings.admin_keys)):
            for i, entry in enumerate(entries):
                digest, name = self._resolve(entry, f"{role.name.lower()}-{i}")
                known = self._by_digest.get(digest)
                # A key listed as both keeps the stronger role.
                if known is None or known.role < role:
                    self._by_digest[digest] = Principal(name, role)

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
        if principal is None:
            raise IrosError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        if principal.role < need:
            raise IrosError(
                403, "this endpoint needs an admin key", type="permission_error", code="admin_required"
            )
        return principal
