"""Dashboard sessions end on logout in every worker: a revocation in the data directory."""

from __future__ import annotations

from pathlib import Path

from iros.config import AuthSettings
from iros.gateway.auth import KeyRing
from iros.gateway.sessions import Sessions
from tests.conftest import ADMIN_KEY


def ring(data_dir: Path) -> KeyRing:
    """One worker's key ring: its own Sessions over the shared data directory."""
    auth = AuthSettings.model_validate({"admin_keys": [ADMIN_KEY]})
    return KeyRing(auth, Sessions.for_data_dir(data_dir))


class TestLogout:
    def test_a_logged_out_token_fails_in_every_worker(self, tmp_path: Path) -> None:
        """Worker A issues, worker B checks it, A logs it out: both refuse it from then on."""
        a, b = ring(tmp_path), ring(tmp_path)
        token = a.issue_session(ADMIN_KEY)
        assert token and b.check_session(token) is not None
        assert a.end_session(token)
        assert a.check_session(token) is None and b.check_session(token) is None
        other = b.issue_session(ADMIN_KEY)
        assert other and a.check_session(other) is not None  # only that session ended

    def test_only_valid_tokens_are_recorded(self, tmp_path: Path) -> None:
        """A forged or malformed token cannot grow the revocation file."""
        a = ring(tmp_path)
        token = a.issue_session(ADMIN_KEY)
        assert token
        name, expiry, _, mac = token.split(".")
        assert not a.end_session(f"{name}.{expiry}.other.{mac}")
        assert not a.end_session("garbage")
        assert not (tmp_path / "dashboard-revoked").exists()

    def test_expired_revocations_are_dropped_when_read(self, tmp_path: Path) -> None:
        """Ids whose tokens have expired anyway are not kept in memory."""
        (tmp_path / "dashboard-revoked").write_text("old 1\nfresh 99999999999\n")
        sessions = Sessions.for_data_dir(tmp_path)
        assert set(sessions._revoked_now()) == {"fresh"}
