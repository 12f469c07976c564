"""The seed's optimization actions as changes of live settings, worked out from their current values.

changes, note = action_changes("increase_cache_size", tuning)   # {"cache.max_memory_mb": 512, ...}, None
"""

from __future__ import annotations

from typing import Any

from iros.optimization.tuning import Tuning, floor_threshold

THRESHOLD_STEP = 0.05  # adjust_cache_similarity_threshold lowers the threshold this much
UNMEASURED_THRESHOLD_DROP = 0.10  # without a verifier curve, at most this far below the configured one


def action_changes(action: str, tuning: Tuning) -> tuple[dict[str, Any], str | None]:
    """The live settings one seed action sets, from their current values; a note when it cannot."""

    def has(name: str) -> bool:
        return tuning.available(name)

    match action:
        case "enable_aggressive_caching":
            if not has("cache.max_temperature"):
                return {}, "the cache is off"
            ttl = tuning.get("cache.ttl_seconds")
            # Cache sampled answers too, and keep every answer four times as long.
            return {"cache.max_temperature": 2.0, "cache.ttl_seconds": ttl * 4 if ttl else ttl}, None
        case "switch_to_lightweight_models":
            return {"models.lightweight_only": True}, None
        case "increase_batch_size":
            if not has("embedder.max_batch"):
                return {}, "no embedder (the semantic cache is off)"
            return {"embedder.max_batch": min(1024, tuning.get("embedder.max_batch") * 2)}, None
        case "adjust_cache_similarity_threshold":
            if not has("cache.similarity_threshold"):
                return {}, "the cache is off"
            cache = tuning.cache
            assert cache is not None  # has() said the cache is on
            current = tuning.get("cache.similarity_threshold")
            curve = getattr(cache.verifier, "curve", None) if cache.verifier is not None else None
            lowest = (
                floor_threshold(cache)
                if curve
                else cache.settings.similarity_threshold - UNMEASURED_THRESHOLD_DROP
            )
            target = round(max(current - THRESHOLD_STEP, lowest), 4)
            if target >= current:
                return {}, f"the threshold {current} is at the precision floor's {lowest:.3f}"
            return {"cache.similarity_threshold": target}, None
        case "enable_cache_warming":
            if not has("cache.warming"):
                return {}, "the cache is off"
            return {"cache.warming": True}, None
        case "increase_cache_size":
            if not has("cache.max_memory_mb"):
                return {}, "the cache is off"
            return {
                "cache.max_memory_mb": tuning.get("cache.max_memory_mb") * 2,
                "cache.max_entries": tuning.get("cache.max_entries") * 2,
            }, None
    raise ValueError(f"unknown action {action!r}")
