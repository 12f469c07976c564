"""Sessions for people: the dashboard's login form trades an admin key for a signed token, sent back
as a cookie and checked by KeyRing.authenticate as "Authorization: Session <token>".

sessions = Sessions.for_data_dir(Path("iros-data"))     # the secret file every worker shares
keyring = KeyRing(settings.auth, sessions)
token = keyring.issue_session(admin_key)                 # None for a client key or an unknown one
keyring.check_session(token)                             # the admin Principal, or None
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("iros.dashboard")

SESSION_SECONDS = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Stateless signed tokens: name.expiry.HMAC(secret, name|expiry|key digest).

    Every worker reads the same secret file in the data directory, so a token made by one is good in
    all; removing the key from the config (or deleting the secret file) ends its sessions.
    """

    def __init__(self, secret: bytes | Path, ttl: float = SESSION_SECONDS) -> None:
        # A path is read (or created) at the first sign-in or check, not when the app is built.
        self._secret = secret
        self.ttl = ttl

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Sessions:
        return cls(data_dir / "dashboard-session.key")

    @property
    def secret(self) -> bytes:
        if isinstance(self._secret, Path):
            try:
                self._secret = _load_secret(self._secret)
            except OSError as exc:
                # A full or read-only disk must not stop the gateway: sessions then last as long as
                # this process and are not shared with other workers, which the log says.
                log.warning(
                    "cannot keep the session secret in %s (%s): sessions end on restart", self._secret, exc
                )
                self._secret = secrets.token_bytes(32)
        return self._secret

    def _sign(self, name: str, expiry: int, digest: str) -> str:
        mac = hmac.new(self.secret, f"{name}|{expiry}|{digest}".encode(), hashlib.sha256)
        return _b64(mac.digest())

    def issue(self, name: str, digest: str) -> str:
        """A token for the key named `name` whose digest is `digest`."""
        expiry = int(time.time() + self.ttl)
        return f"{_b64(name.encode())}.{expiry}.{self._sign(name, expiry, digest)}"

    def verify(self, token: str, digest_of: Callable[[str], str | None]) -> str | None:
        """The key name a valid, unexpired token was issued to, while that key is still configured
        (`digest_of` gives its digest now); None otherwise."""
        try:
            raw_name, raw_expiry, mac = token.split(".")
            name, expiry = _unb64(raw_name).decode(), int(raw_expiry)
        except (ValueError, UnicodeDecodeError):
            return None
        digest = digest_of(name)
        if digest is None or expiry < time.time():
            return None
        if not hmac.compare_digest(mac, self._sign(name, expiry, digest)):
            return None
        return name


def _load_secret(path: Path) -> bytes:
    """Read the session secret, creating it (0600) on first use; workers racing to create it agree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            data = path.read_bytes()
            if len(data) == 32:
                return data
            time.sleep(0.01)  # another worker is between create and write
        raise RuntimeError(f"{path} is not a 32-byte session secret: delete it and restart") from None
    data = secrets.token_bytes(32)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        path.unlink(missing_ok=True)  # never leave a short secret for the next start to trip on
        raise
    return data
