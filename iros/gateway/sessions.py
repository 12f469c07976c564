"""Sessions for people: the dashboard's login form trades an admin key for a signed token, sent back
as a cookie and checked by KeyRing.authenticate as "Authorization: Session <token>".

sessions = Sessions.for_data_dir(Path("iros-data"))     # the secret file every worker shares
keyring = KeyRing(settings.auth, sessions)
token = keyring.issue_session(admin_key)                 # None for a client key or an unknown one
keyring.check_session(token)                             # the admin Principal, or None
sessions.revoke(token)                                   # logout: this token fails in every worker
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
    """Signed tokens: name.expiry.id.HMAC(secret, name|expiry|id|key digest), with a random id per
    sign-in.

    Every worker reads the same secret file in the data directory, so a token made by one is good in
    all; removing the key from the config (or deleting the secret file) ends its sessions. Logging out
    appends the token's id to a revocation file beside the secret, which every worker rereads when it
    changes (one stat per check), so a logged-out cookie fails everywhere at once; ids whose tokens
    have expired anyway are skipped when it is read.
    """

    def __init__(
        self, secret: bytes | Path, ttl: float = SESSION_SECONDS, revoked: Path | None = None
    ) -> None:
        # A path is read (or created) at the first sign-in or check, not when the app is built.
        self._secret = secret
        self.ttl = ttl
        self._revoked_path = revoked
        self._revoked: dict[str, int] = {}  # session id -> its token's expiry
        self._revoked_seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> Sessions:
        return cls(data_dir / "dashboard-session.key", revoked=data_dir / "dashboard-revoked")

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

    def _sign(self, name: str, expiry: int, sid: str, digest: str) -> str:
        mac = hmac.new(self.secret, f"{name}|{expiry}|{sid}|{digest}".encode(), hashlib.sha256)
        return _b64(mac.digest())

    def issue(self, name: str, digest: str) -> str:
        """A token for the key named `name` whose digest is `digest`."""
        expiry = int(time.time() + self.ttl)
        sid = secrets.token_urlsafe(12)
        return f"{_b64(name.encode())}.{expiry}.{sid}.{self._sign(name, expiry, sid, digest)}"

    def verify(self, token: str, digest_of: Callable[[str], str | None]) -> str | None:
        """The key name a valid, unexpired, not revoked token was issued to, while that key is still
        configured (`digest_of` gives its digest now); None otherwise."""
        parsed = _parse(token)
        if parsed is None:
            return None
        name, expiry, sid, mac = parsed
        digest = digest_of(name)
        if digest is None or expiry < time.time():
            return None
        if not hmac.compare_digest(mac, self._sign(name, expiry, sid, digest)):
            return None
        if sid in self._revoked_now():
            return None
        return name

    def revoke(self, token: str) -> None:
        """End the session of a token (logout) in every worker; a malformed token is ignored.

        Only a token that verifies should be passed (the caller checks): the file grows by one short
        line per logout."""
        parsed = _parse(token)
        if parsed is None:
            return
        _, expiry, sid, _ = parsed
        self._revoked[sid] = expiry
        if self._revoked_path is None:
            return
        try:
            self._revoked_path.parent.mkdir(parents=True, exist_ok=True)
            # One short append: atomic between workers (O_APPEND), so none is lost to another.
            fd = os.open(self._revoked_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{sid} {expiry}\n".encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "cannot record a logout in %s (%s): other workers still accept it", self._revoked_path, exc
            )

    def _revoked_now(self) -> dict[str, int]:
        path = self._revoked_path
        if path is None:
            return self._revoked
        try:
            st = path.stat()
        except OSError:  # none yet (no logout), or unreadable: what this process knows
            return self._revoked
        seen = (st.st_mtime_ns, st.st_size)
        if seen != self._revoked_seen:
            now = time.time()
            revoked = dict(self._revoked)
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                lines = []
            for line in lines:
                sid, _, expiry = line.partition(" ")
                if expiry.isdigit() and int(expiry) >= now:
                    revoked[sid] = int(expiry)
            self._revoked = {sid: e for sid, e in revoked.items() if e >= now}
            self._revoked_seen = seen
        return self._revoked


def _parse(token: str) -> tuple[str, int, str, str] | None:
    """name, expiry, session id and signature of a token; None for anything else."""
    try:
        raw_name, raw_expiry, sid, mac = token.split(".")
        return _unb64(raw_name).decode(), int(raw_expiry), sid, mac
    except (ValueError, UnicodeDecodeError):
        return None


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
