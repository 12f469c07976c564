"""The auto-optimization engine and the tuning API, in-process with an injected clock and fixed KPIs."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from iros.app import IrosApp, create_app
from iros.conditions.parse import Match, StaticSource, Stats
from iros.config import OptimizationRule, load_settings
from iros.optimization.actionlog import read_audit
from tests.conftest import ADMIN_KEY, CLIENT_KEY


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _settings(data_dir: str, rules: list[dict[str, Any]], **auto: Any) -> Any:
    return load_settings(
        None,
        {
            "server": {"data_dir": data_dir},
            "auth": {"open": False, "api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
            "models": [
                {
                    "name": "big",
                    "backend": "simulated",
                    "profile": "instant",
                    "group": "chat",
                    "accuracy": 0.92,
                },
                {
                    "name": "small",
                    "backend": "simulated",
                    "profile": "instant",
                    "group": "chat",
                    "accuracy": 0.80,
                    "tags": ["lightweight"],
                },
            ],
            "cache": {"enabled": True, "semantic": False},
            "metrics_collection": {"enabled": False},
            "optimization": {
                "model_optimization": {"exploration_rate": 0},
                "auto_optimization": {"cooldown_seconds": 60, "optimization_rules": rules, **auto},
            },
        },
    )


HIGH_LOAD = {
    "name": "high_load_optimization",
    "trigger": "cpu_usage > 7.0 for 5m",
    "actions": ["enable_aggressive_caching", "switch_to_lightweight_models", "increase_cache_size"],
}


class ChangingKpis(StaticSource):
    """KPIs a test changes between evaluations (StaticSource keeps a copy of what it was given)."""

    def __init__(self, kpis: dict[str, Any]) -> None:
        super().__init__(kpis)
        self.live = kpis

    def kpis(self, now: float) -> dict[str, Any]:
        return self.live

    async def stats(self, metric: str, match: Match, seconds: float, now: float) -> Stats:
        return Stats()


class Rig:
    """A real app (gateway, router, cache, optimizer) whose rules read `kpis` at the clock's time."""

    def __init__(self, app: IrosApp, clock: Clock, kpis: dict[str, Any], data_dir: str) -> None:
        self.app, self.clock, self.kpis, self.data_dir = app, clock, kpis, data_dir
        assert app.optimizer is not None
        self.optimizer = app.optimizer
        self.tuning = app.optimizer.tuning
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")

    async def tick(self, seconds: float = 0) -> None:
        self.clock.now += seconds
        await self.optimizer.tick()

    async def ask(
        self, model: str = "chat", content: str = "hello", cache_control: str = ""
    ) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        headers = {"authorization": f"Bearer {CLIENT_KEY}", "cache-control": cache_control}
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(method, path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kw)


@pytest.fixture
async def make_rig() -> AsyncIterator[Any]:
    rigs: list[Rig] = []

    async def make(rules: list[dict[str, Any]], **auto: Any) -> Rig:
        data_dir = tempfile.mkdtemp(prefix="iros-opt-")
        app = create_app(_settings(data_dir, rules, **auto))
        clock = Clock()
        kpis: dict[str, Any] = {"cpu_usage_avg": 1.0, "response_time_avg": 900.0, "count": 10}
        assert app.optimizer is not None and app.gateway.cache is not None
        app.optimizer.source = ChangingKpis(kpis)
        app.optimizer.clock = clock
        await app.gateway.cache.start()
        rig = Rig(app, clock, kpis, data_dir)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.http.aclose()
        assert rig.app.gateway.cache is not None
        await rig.app.gateway.cache.close()
        rig.optimizer.log.close()


class TestRules:
    async def test_trigger_held_for_its_duration_applies_the_actions(self, make_rig: Any) -> None:
        """A trigger true for its whole `for` applies every action, and routing follows the change."""
        rig = await make_rig([HIGH_LOAD])
        cache = rig.app.gateway.cache
        before_memory = cache.settings.max_memory_mb
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick()
        await rig.tick(299)
        assert not rig.tuning.lightweight_only  # pending: not held 5m yet
        await rig.tick(1)
        assert rig.tuning.lightweight_only
        assert cache.settings.max_temperature == 2.0
        assert cache.settings.max_memory_mb == before_memory * 2
        answers = [await rig.ask(content=f"q{i}") for i in range(6)]
        assert {r.headers["x-iros-model"] for r in answers} == {"small"}
        applied = [r for r in read_audit(rig.data_dir) if r["event"] == "applied"]
        assert applied and applied[0]["rule"] == "high_load_optimization"
        assert applied[0]["changes"]["models.lightweight_only"] == {"before": False, "after": True}

    async def test_cooldown_reverts_after_the_trigger_is_clear(self, make_rig: Any) -> None:
        """Actions stay while the trigger is clear for less than the cool-down and are undone after it."""
        rig = await make_rig([{**HIGH_LOAD, "trigger": "cpu_usage > 7.0"}])
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick()
        assert rig.tuning.lightweight_only
        rig.kpis["cpu_usage_avg"] = 2.0
        await rig.tick(1)
        await rig.tick(59)
        assert rig.tuning.lightweight_only
        await rig.tick(1)
        assert not rig.tuning.lightweight_only
        assert rig.app.gateway.cache.settings.max_temperature == 0.7
        events = [r["event"] for r in read_audit(rig.data_dir)]
        assert events[:2] == ["reverted", "applied"]

    async def test_trigger_returning_during_cooldown_keeps_the_actions(self, make_rig: Any) -> None:
        """A trigger that comes back before the cool-down ends restarts the wait."""
        rig = await make_rig([{**HIGH_LOAD, "trigger": "cpu_usage > 7.0"}])
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick()
        rig.kpis["cpu_usage_avg"] = 2.0
        await rig.tick(50)
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick(5)
        rig.kpis["cpu_usage_avg"] = 2.0
        await rig.tick(5)
        await rig.tick(59)
        assert rig.tuning.lightweight_only

    async def test_dry_run_only_audits(self, make_rig: Any) -> None:
        """In dry-run mode a firing rule is audited with what it would change, and nothing changes."""
        rig = await make_rig([{**HIGH_LOAD, "trigger": "cpu_usage > 7.0"}], dry_run=True)
        before = rig.tuning.snapshot()
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick()
        assert rig.tuning.snapshot() == before
        row = read_audit(rig.data_dir)[0]
        assert row["event"] == "would_apply" and row["dry_run"] is True
        assert row["changes"]["models.lightweight_only"] == {"before": False, "after": True}

    async def test_a_later_hand_change_survives_the_revert(self, make_rig: Any) -> None:
        """Reverting leaves a setting someone changed after the rule applied it as they set it."""
        rig = await make_rig([{**HIGH_LOAD, "trigger": "cpu_usage > 7.0"}])
        rig.kpis["cpu_usage_avg"] = 9.0
        await rig.tick()
        await rig.tuning.set({"cache.max_temperature": 1.1}, "test")
        rig.kpis["cpu_usage_avg"] = 2.0
        await rig.tick(1)
        await rig.tick(60)
        assert not rig.tuning.lightweight_only
        assert rig.app.gateway.cache.settings.max_temperature == 1.1

    async def test_compare_shows_kpis_before_and_after(self, make_rig: Any) -> None:
        """/api/analysis/compare/optimizations gives each action's KPIs before and after, and the change."""
        rig = await make_rig([{**HIGH_LOAD, "trigger": "cpu_usage > 7.0"}])
        rig.kpis.update(cpu_usage_avg=9.0, response_time_avg=3000.0)
        await rig.tick()
        rig.kpis.update(cpu_usage_avg=2.0, response_time_avg=1200.0)
        await rig.tick(1)
        await rig.tick(60)
        response = await rig.admin("GET", "/api/analysis/compare/optimizations")
        assert response.status_code == 200
        [item] = response.json()["optimizations"]
        assert item["kpis_before"]["response_time_avg"] == 3000.0
        assert item["kpis_after"]["response_time_avg"] == 1200.0
        assert item["delta"]["response_time_avg"] == -1800.0
        assert item["reverted_at"] == rig.clock.now and item["active"] is False

    async def test_cache_actions_change_threshold_and_warm_frequent_misses(self, make_rig: Any) -> None:
        """adjust_cache_similarity_threshold lowers the threshold; warming caches the frequent misses."""
        rule = {
            "name": "low_cache_hit_optimization",
            "trigger": "cache_hit_rate < 0.6",
            "actions": ["adjust_cache_similarity_threshold", "enable_cache_warming", "increase_batch_size"],
        }
        rig = await make_rig([rule])
        cache = rig.app.gateway.cache
        for i in range(3):
            # Missed and not stored: only warming can put these answers in the cache.
            answer = await rig.ask(content=f"popular {i}", cache_control="no-store")
            assert answer.headers["x-iros-cache"] == "miss"
        rig.kpis["cache_hit_rate"] = 0.2
        await rig.tick()
        assert cache.threshold == pytest.approx(cache.settings.similarity_threshold - 0.05)
        assert rig.tuning.cache_warming
        assert await rig.optimizer.warm() == 3
        assert (await rig.ask(content="popular 1")).headers["x-iros-cache"] == "hit"
        row = read_audit(rig.data_dir)[0]
        assert "increase_batch_size" in row["note"]  # no embedder: said, not silently skipped


class TestTuningAPI:
    async def test_models_tune_changes_selection_live(self, make_rig: Any) -> None:
        """PUT /api/optimization/models/tune with a quality threshold routes `chat` to the accurate model."""
        rig = await make_rig([])
        response = await rig.admin("PUT", "/api/optimization/models/tune", json={"quality_threshold": 0.9})
        assert response.status_code == 200
        assert response.json()["applied"]["models.quality_threshold"] == {"before": None, "after": 0.9}
        answers = [await rig.ask(content=f"t{i}") for i in range(5)]
        assert {r.headers["x-iros-model"] for r in answers} == {"big"}
        rows = read_audit(rig.data_dir)
        assert any(r["event"] == "changed" and r["source"] == "api:models/tune" for r in rows)

    async def test_resources_tune_enforces_memory_limits(self, make_rig: Any) -> None:
        """A memory limit caps the cache's memory, and the answer reports what is enforced."""
        rig = await make_rig([])
        response = await rig.admin("PUT", "/api/optimization/resources/tune", json={"memory_limit_mb": 256})
        assert response.status_code == 200
        body = response.json()
        assert body["memory_limit_mb"] == 256
        assert body["enforced"]["cache_max_memory_mb"] == 128
        assert rig.app.gateway.cache.settings.max_memory_mb == 128

    async def test_cache_tune_goes_through_the_live_settings(self, make_rig: Any) -> None:
        """The cache tuning endpoint changes the live object, so the change is audited."""
        rig = await make_rig([])
        response = await rig.admin("PUT", "/api/optimization/cache/tune", json={"similarity_threshold": 0.9})
        assert response.status_code == 200
        assert rig.tuning.get("cache.similarity_threshold") == 0.9
        assert read_audit(rig.data_dir)[0]["source"] == "api:cache/tune"

    @pytest.mark.parametrize(
        ("body", "words"),
        [
            (
                {"rules": [{"name": "r", "trigger": "cpu_usage >", "actions": ["increase_cache_size"]}]},
                "trigger",
            ),
            ({"rules": [{"name": "r", "trigger": "cpu_usage > 1", "actions": ["reboot"]}]}, "actions"),
            (
                {"rules": [{"name": "r", "trigger": "nonsense_kpi > 1", "actions": ["increase_cache_size"]}]},
                "trigger",
            ),
            ({"dry_run": "yes"}, "dry_run"),
            ({"cooldown": 5}, "unknown field"),
        ],
    )
    async def test_bad_rules_get_a_clear_400(self, make_rig: Any, body: dict[str, Any], words: str) -> None:
        """A rule the engine cannot run is refused with a 400 that says what is wrong."""
        rig = await make_rig([])
        response = await rig.admin("PUT", "/api/optimization/rules", json=body)
        assert response.status_code == 400, response.text
        assert words in response.json()["error"]["message"]

    async def test_rules_put_replaces_and_needs_the_admin_key(self, make_rig: Any) -> None:
        """PUT /api/optimization/rules replaces the rules (admin only) and GET lists them with state."""
        rig = await make_rig([HIGH_LOAD])
        new = {
            "name": "slow",
            "trigger": "response_time_p95 > 5000 for 3m",
            "actions": ["enable_cache_warming"],
        }
        denied = await rig.http.put(
            "/api/optimization/rules",
            json={"rules": [new]},
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert denied.status_code in (401, 403)
        response = await rig.admin("PUT", "/api/optimization/rules", json={"rules": [new], "dry_run": True})
        assert response.status_code == 200
        listed = (await rig.admin("GET", "/api/optimization/rules")).json()
        assert listed["dry_run"] is True
        assert [r["name"] for r in listed["rules"]] == ["slow"] and listed["rules"][0]["state"] == "clear"
        assert OptimizationRule(**{k: listed["rules"][0][k] for k in ("name", "trigger", "actions")})
