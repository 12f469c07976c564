"""Wrong keys slow their own address down, never anyone's right key for long, and fade away."""

from __future__ import annotations

from iros.gateway.keyguard import MAX_ADDRESSES, MAX_FAILURES, MAX_PENALTY, STEP, WINDOW, KeyGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing(times: int, address: str = "10.0.0.1") -> tuple[KeyGuard, Clock]:
    clock = Clock()
    guard = KeyGuard(clock)
    for _ in range(times):
        guard.failed(address)
    return guard, clock


class TestKeyGuard:
    def test_nothing_is_slowed_until_an_address_fails_often(self) -> None:
        """Below MAX_FAILURES an address is not slowed; the guard is idle with no failures at all."""
        assert not KeyGuard().active
        guard, _ = failing(MAX_FAILURES - 1)
        assert guard.active and guard.penalty("10.0.0.1", b"Bearer x") == 0.0

    def test_the_penalty_grows_with_failures_up_to_its_cap(self) -> None:
        """Each failure past the limit adds STEP seconds, never more than MAX_PENALTY in all."""
        guard, _ = failing(MAX_FAILURES)
        assert guard.penalty("10.0.0.1", b"Bearer x") == STEP
        guard, _ = failing(MAX_FAILURES + 1000)
        assert guard.penalty("10.0.0.1", b"Bearer x") == MAX_PENALTY

    def test_other_addresses_and_known_keys_are_not_slowed(self) -> None:
        """Another address is untouched, and a key that worked from the failing one passes at once."""
        guard, _ = failing(1)
        guard.passed("10.0.0.1", b"Bearer good")
        for _ in range(MAX_FAILURES + 5):
            guard.failed("10.0.0.1")
        assert guard.penalty("10.0.0.2", b"Bearer x") == 0.0
        assert guard.penalty("10.0.0.1", b"Bearer good") == 0.0
        assert guard.penalty("10.0.0.1", b"Bearer other") > 0.0
        assert guard.penalty("10.0.0.1", None) > 0.0  # a sign-in: the key is in the form

    def test_failures_fade_and_the_address_is_forgotten(self) -> None:
        """An address that stops guessing is back to full speed within a couple of windows."""
        guard, clock = failing(MAX_FAILURES + 1000)
        clock.now += 2 * WINDOW + (MAX_PENALTY / STEP) * WINDOW / MAX_FAILURES
        assert guard.penalty("10.0.0.1", b"Bearer x") == 0.0
        assert not guard.active

    def test_the_addresses_remembered_are_bounded(self) -> None:
        """A guesser spread over many addresses costs at most MAX_ADDRESSES records."""
        guard = KeyGuard()
        for i in range(MAX_ADDRESSES + 50):
            guard.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert len(guard._addresses) == MAX_ADDRESSES
