"""Calibration: the cut a namespace and model's verified outcomes support at δ, with a confidence bound."""

from __future__ import annotations

import math
import random

import pytest

from iros.cache.calibration import MIN_VERIFIED, SPARSE_SHARE, Calibration, Outcome, wilson

PRIOR = 0.6


def test_wilson_interval_holds_the_rate_and_narrows_with_evidence() -> None:
    """The interval contains the observed rate and shrinks as the count grows; none observed: [0, 1]."""
    low, high = wilson(5, 100)
    assert low < 0.05 < high
    wide = wilson(1, 20)
    narrow = wilson(50, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson(0, 0) == (0.0, 1.0)
    # With no error in 73 the upper end is just under 5%: what a cut needs at δ = 0.05.
    assert wilson(0, 73)[1] < 0.05 < wilson(0, 60)[1]


def test_without_outcomes_the_prior_decides() -> None:
    """A scope nothing was verified in keeps the prior's cut and samples densely."""
    calibration = Calibration(0.05, 0.2)
    scope = calibration.scope("team-a", "chat")
    assert scope.cut(PRIOR) == PRIOR
    assert scope.share(PRIOR) == 0.2


def test_right_outcomes_below_the_prior_lower_the_cut() -> None:
    """Verified hits all right down to 0.4 let the cut move under the prior; sampling turns sparse."""
    scope = Calibration(0.05, 0.2).scope("team-a", "chat")
    for i in range(200):
        scope.record(0.4 + 0.5 * i / 200, True, 1.0, served=True)
    cut = scope.cut(PRIOR)
    assert cut < PRIOR
    report = scope.report(PRIOR)
    assert report["calibrated"] and report["interval"][1] <= 0.05
    assert scope.share(PRIOR) == SPARSE_SHARE


def test_wrong_outcomes_above_the_prior_raise_the_cut() -> None:
    """Where the prior's cut serves one wrong answer in five, the cut rises to where the rate is under δ."""
    scope = Calibration(0.05, 0.2).scope("team-a", "chat")
    rng = random.Random(1)
    for _ in range(400):
        score = rng.uniform(0.6, 1.0)
        scope.record(score, score > 0.8 or rng.random() < 0.5, 1.0, served=True)
    cut = scope.cut(PRIOR)
    assert cut >= 0.78
    report = scope.report(PRIOR)
    assert report["false_hit_rate"] is not None and report["false_hit_rate"] <= 0.05


def test_a_scope_whose_hits_are_all_wrong_stops_serving() -> None:
    """Enough wrong outcomes and no score range under δ: the cut is infinite (nothing served)."""
    scope = Calibration(0.05, 0.2).scope("team-a", "chat")
    for i in range(MIN_VERIFIED * 2):
        scope.record(0.6 + 0.01 * i, False, 1.0, served=True)
    assert math.isinf(scope.cut(PRIOR))
    # Near-misses are still checked against the prior's cut, so the scope can come back.
    assert scope.near(PRIOR - 0.1, PRIOR)


def test_every_candidate_under_the_cut_is_a_near_miss_but_a_rule_refusal() -> None:
    """However far under the cut a candidate scored, its outcome can move the cut, so verification
    judges it; a score of 0 (a rule refused it) never is, and never becomes servable."""
    scope = Calibration(0.05, 0.2).scope("team-a", "chat")
    assert scope.near(0.01, PRIOR) and scope.near(PRIOR - 0.5, PRIOR)
    assert not scope.near(0.0, PRIOR) and not scope.near(PRIOR, PRIOR)
    # Right outcomes far under the prior's cut bring it down to them in one step.
    for i in range(200):
        scope.record(0.1 + 0.001 * i, True, 1.0, served=False)
    assert 0.1 <= scope.cut(PRIOR) < 0.15
    assert not scope.near(0.0, PRIOR)


def test_a_tighter_delta_reaches_every_scope() -> None:
    """set_delta tightens the bound of every scope at once: the same outcomes support a higher cut."""
    calibration = Calibration(0.10, 0.2)
    scope = calibration.scope("team-a", "chat")
    rng = random.Random(2)
    for _ in range(600):
        score = rng.uniform(0.5, 1.0)
        scope.record(score, rng.random() > (1.0 - score) * 0.3, 1.0, served=True)
    loose = scope.cut(PRIOR)
    calibration.set_delta(0.02)
    assert scope.cut(PRIOR) > loose


@pytest.mark.parametrize("delta", [0.02, 0.05, 0.1])
def test_the_calibrated_cut_keeps_the_true_error_under_delta(delta: float) -> None:
    """Simulated traffic whose error falls with the score: what the calibrated cut serves is wrong at
    most δ of the time (measured on fresh draws, not on the outcomes it was fitted to)."""
    rng = random.Random(3)

    def wrong(score: float) -> bool:
        return rng.random() < max(0.0, 0.5 - 0.6 * score)

    scope = Calibration(delta, 0.2).scope("ns", "m")
    for _ in range(3000):
        score = rng.random()
        scope.record(score, not wrong(score), 1.0, served=True)
    cut = scope.cut(PRIOR)
    served = [s for s in (rng.random() for _ in range(20000)) if s >= cut]
    errors = sum(wrong(s) for s in served)
    assert served and errors / len(served) <= delta


def test_scopes_are_bounded() -> None:
    """Namespaces come from API keys; the number of scopes tracked is capped all the same."""
    from iros.cache import calibration as module

    calibration = Calibration(0.05, 0.2)
    for i in range(module.MAX_SCOPES + 10):
        calibration.scope(f"ns-{i}", "m")
    assert len(calibration.scopes) == module.MAX_SCOPES


def test_the_pooled_estimate_flags_a_bound_above_delta_only_with_evidence() -> None:
    """A few wrong outcomes do not raise the flag; many do once the interval's upper end passes δ."""
    calibration = Calibration(0.05, 0.2)
    scope = calibration.scope("ns", "m")
    for _ in range(3):
        scope.record(0.9, False, 1.0, served=True)
    assert not calibration.pooled(PRIOR)["above_bound"]
    for i in range(100):
        scope.record(0.9 + i * 1e-4, i % 5 != 0, 1.0, served=True)
    pooled = calibration.pooled(PRIOR)
    assert pooled["verified"] == 103


def test_a_guarded_scope_serves_nothing_until_its_own_outcomes_allow() -> None:
    """The shared-instruction candidates' scope has no prior: its cut is infinite, every candidate a
    near-miss, until its own outcomes support a cut; the open scope's outcomes never reach it."""
    calibration = Calibration(0.05, 0.2)
    open_, guarded = calibration.scope("team-a", "chat"), calibration.scope("team-a", "chat", guarded=True)
    assert open_ is not guarded
    assert math.isinf(guarded.cut(PRIOR)) and guarded.near(PRIOR + 0.01, PRIOR)
    report = guarded.report(PRIOR)
    assert report["guarded"] and report["prior_cut"] is None and report["cut"] is None
    assert not report["calibrated"]
    calibration.add(Outcome("team-a", "chat", 0.2 + 0.001 * i, True, 1.0, False) for i in range(200))
    assert open_.cut(PRIOR) < PRIOR and math.isinf(guarded.cut(PRIOR))
    calibration.add(Outcome("team-a", "chat", 0.2 + 0.001 * i, True, 1.0, False, True) for i in range(200))
    guarded = calibration.scope("team-a", "chat", guarded=True)
    assert 0.2 <= guarded.cut(PRIOR) < 0.25 and guarded.report(PRIOR)["calibrated"]


def test_an_outcome_without_a_stratum_is_an_open_one() -> None:
    """Outcomes written by a worker of the version before strata read as the open scope's."""
    outcome = Outcome("team-a", "chat", 0.9, True, 1.0, True, True)
    assert Outcome.of_data(outcome.to_data()) == outcome
    older = {k: v for k, v in outcome.to_data().items() if k != "guarded"}
    assert Outcome.of_data(older) == Outcome("team-a", "chat", 0.9, True, 1.0, True)


def test_a_guarded_scope_is_kept_only_once_judged() -> None:
    """Flagged candidates met at lookups take no place among the scopes until one is judged; then its
    outcome is kept, apart from the open scope's."""
    calibration = Calibration(0.05, 0.2)
    assert math.isinf(calibration.scope("team-a", "chat", guarded=True).cut(PRIOR))
    assert calibration.scopes == {}
    calibration.add([Outcome("team-a", "chat", 0.3, True, 1.0, False, guarded=True)])
    assert list(calibration.scopes) == [("team-a", "chat", True)]
    assert calibration.scope("team-a", "chat", guarded=True).verified == 1
    assert calibration.scope("team-a", "chat").verified == 0
