"""Reading environment variables, in one place: typed getters whose errors name the variable.

Every setting object (`core.settings.Settings`, `labelstudio.settings.LabelStudioSettings`,
`server.settings.ServerSettings`) and the job constants read the environment through these. A getter takes
the mapping to read (`os.environ`, or a dict in tests) so nothing here reads the process environment behind
the caller's back. An unset or empty variable gives the default; a value that does not parse raises
`ValueError("NAME='value' is not a valid int")`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

Environ = Mapping[str, str]

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def environ(env: Environ | None = None) -> Environ:
    """`env`, or the process environment when None."""
    return os.environ if env is None else env


def parse_bool(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE or value == "":
        return False
    raise ValueError(f"{name}={raw!r} is not a valid bool (use {'/'.join(TRUE)} or {'/'.join(FALSE)})")


def parse_csv(raw: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def parse_as(kind: type, raw: str, name: str) -> Any:
    """`raw` as `kind` (str, int, float, bool or tuple: comma-separated); the error names `name`."""
    if kind is bool:
        return parse_bool(raw, name)
    if kind is tuple:
        return parse_csv(raw)
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
    return raw


def _raw(env: Environ, name: str) -> str | None:
    value = env.get(name)
    return None if value is None or value.strip() == "" else value


def get_str(env: Environ, name: str, default: str | None = None) -> str | None:
    """The value, or `default` when unset or empty."""
    raw = _raw(env, name)
    return default if raw is None else raw


def get_int(env: Environ, name: str, default: int, minimum: int | None = None) -> int:
    """An integer; values below `minimum` are raised to it."""
    raw = _raw(env, name)
    value = default if raw is None else int(parse_as(int, raw, name))
    return value if minimum is None else max(minimum, value)


def get_float(env: Environ, name: str, default: float) -> float:
    raw = _raw(env, name)
    return default if raw is None else float(parse_as(float, raw, name))


def get_bool(env: Environ, name: str, default: bool) -> bool:
    raw = _raw(env, name)
    return default if raw is None else parse_bool(raw, name)


def get_csv(env: Environ, name: str) -> tuple[str, ...]:
    """Comma-separated items, stripped; () when unset."""
    raw = _raw(env, name)
    return () if raw is None else parse_csv(raw)


def first_str(env: Environ, *names: str) -> str | None:
    """The first of `names` that is set (e.g. LABEL_STUDIO_URL, then its older name LABEL_STUDIO_HOST)."""
    for name in names:
        value = get_str(env, name)
        if value is not None:
            return value
    return None
