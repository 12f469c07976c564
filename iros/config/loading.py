"""Loading settings: the YAML file (or the embedded default.yaml), IROS_* environment overrides on top,
errors that name each bad field; and the settings as shown back (secrets redacted).

settings = load_settings("iros.yaml")          # YAML, then IROS_SERVER__PORT=9000 etc. on top
settings = load_settings(None)                 # the embedded default (simulated models)
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from iros.config.settings import Settings
from iros.core.errors import error_path
from iros.core.redact import redact_urls

DEFAULT_CONFIG = "default.yaml"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names each bad field."""


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        text = resources.files("iros.config").joinpath(DEFAULT_CONFIG).read_text()
        source = "the embedded default config"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such config file")
        text = p.read_text()
        source = str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (server, models, ...)")
    if odd := [k for k in data if not isinstance(k, str)]:
        raise ConfigError(f"{source}: section names must be words (server, models, ...), not {odd[0]!r}")
    return data


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    data = _merge(read_yaml(path), overrides or {})
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, data)) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def format_errors(exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = error_path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            known = _known_fields(err["loc"][:-1])
            close = difflib.get_close_matches(field, known, n=1)
            msg = f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}"
        lines.append(f"{loc or '(top level)'}: {msg}")
    env = sorted(k for k in os.environ if k.startswith("IROS_"))
    note = f"\n(environment overrides in effect: {', '.join(env)})" if env else ""
    return "invalid configuration:\n  " + "\n  ".join(lines) + note


def _known_fields(loc: tuple[int | str, ...]) -> list[str]:
    model: Any = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", None)
        model = next((a for a in args or () if hasattr(a, "model_fields")), ann)
    return list(getattr(model, "model_fields", {}))


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings, with every key and secret replaced by a marker, and every URL's
    userinfo (models, embedder, Redis, Prometheus, channels) by ***."""
    data: dict[str, Any] = redact_urls(settings.model_dump(mode="json"))
    for kind in ("api_keys", "admin_keys"):
        data["auth"][kind] = [
            {"name": k["name"], "key_env": k["key_env"], "key": "***"} for k in data["auth"][kind]
        ]
    return data
