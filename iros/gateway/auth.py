"""API keys: clients may call the model API; admins may also change settings under /api/*.

Keys are held only as SHA-256 digests, so a key never sits in memory, logs or API output in clear.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from enum import IntEnum

from iros.config import AuthSettings, Budget, ConfigError, KeyEntry
from iros.core.errors import IrosError
from iros.gateway.sessions import Sessions


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
    def __init__(self, settings: AuthSettings, sessions: Sessions | None = None) -> None:
        self.open = settings.open
        # Cookie sessions (the dashboard's login form) arrive as "Authorization: Session <token>",
        # put there by the dashboard's SessionCookieMiddleware.
        self.sessions = sessions
        self._by_digest: dict[str, Principal] = {}
        self.budgets: dict[str, Budget] = {}  # key name -> its spending budget (gateway/budgets.py)
        for role, entries in ((Role.CLIENT, settings.api_keys), (Role.ADMIN, settings.admin_keys)):
            for i, entry in enumerate(entries):
                digest, name = self._resolve(entry, f"{role.name.lower()}-{i}")
                if entry.budget is not None:
                    self.budgets.setdefault(name, entry.budget)
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

    def issue_session(self, key: str) -> str | None:
        """A session token for an admin key in clear; None for a client or unknown key, or no sessions."""
        found = self.find(key)
        if self.sessions is None or found is None or found[1].role < Role.ADMIN:
            return None
        digest, principal = found
        return self.sessions.issue(principal.name, digest)

    def end_session(self, token: str) -> bool:
        """Logout: a valid session token is revoked in every worker; False for anything else."""
        if self.sessions is None or self.check_session(token) is None:
            return False
        self.sessions.revoke(token)
        return True

    def check_session(self, token: str) -> Principal | None:
        name = self.sessions.verify(token, self.digest_of) if self.sessions is not None else None
        return Principal(name, Role.ADMIN) if name is not None else None

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
        if principal is None and scheme.lower() == "session":
            principal = self.check_session(key.strip())
        if principal is None:
            raise IrosError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        if principal.role < need:
            raise IrosError(
                403, "this endpoint needs an admin key", type="permission_error", code="admin_required"
            )
        return principal
