"""The environment getters every settings object reads through."""

from __future__ import annotations

import pytest

from axx_backend.core.env import first_str, get_bool, get_csv, get_float, get_int, get_str
from axx_backend.core.settings import Settings
from axx_backend.labelstudio.settings import LabelStudioSettings
from axx_backend.server.settings import ServerSettings


def test_getters_parse_and_default() -> None:
    env = {"S": "x", "E": " ", "I": "7", "F": "2.5", "B": "Yes", "C": "a, b,,c"}
    assert get_str(env, "S") == "x" and get_str(env, "E", "d") == "d" and get_str(env, "MISSING") is None
    assert get_int(env, "I", 1) == 7 and get_int(env, "MISSING", 3) == 3 and get_int(env, "I", 1, minimum=9) == 9
    assert get_float(env, "F", 0.0) == 2.5 and get_bool(env, "B", False) is True
    assert get_bool({"B": "off"}, "B", True) is False and get_bool({}, "B", True) is True
    assert get_csv(env, "C") == ("a", "b", "c") and get_csv(env, "MISSING") == ()
    assert first_str({"OLD": "o"}, "NEW", "OLD") == "o" and first_str({"NEW": "n", "OLD": "o"}, "NEW", "OLD") == "n"


@pytest.mark.parametrize(
    ("getter", "raw", "kind"), [(get_int, "many", "int"), (get_float, "1,5", "float"), (get_bool, "ture", "bool")]
)
def test_a_bad_value_names_the_variable(getter, raw, kind) -> None:
    with pytest.raises(ValueError, match=rf"AXX_X='{raw}' is not a valid {kind}"):
        getter({"AXX_X": raw}, "AXX_X", 0)


def test_every_settings_object_reads_through_them() -> None:
    with pytest.raises(ValueError, match="AXX_INPUT_SIZE='big' is not a valid int"):
        Settings.from_env({"AXX_INPUT_SIZE": "big"})
    with pytest.raises(ValueError, match="AXX_FETCH_WORKERS"):
        LabelStudioSettings.from_env({"AXX_FETCH_WORKERS": "four"})
    with pytest.raises(ValueError, match="AXX_PRELOAD"):
        ServerSettings.from_env({"AXX_PRELOAD": "maybe"})
    env = {"LABEL_STUDIO_HOST": "http://ls:8080", "LABEL_STUDIO_API_KEY": "k", "AXX_CHOICES_CONTROL": "c"}
    server, ls = ServerSettings.from_env(env), LabelStudioSettings.from_env(env)
    assert (server.labelstudio.url, server.labelstudio.api_key) == (ls.url, ls.api_key) == ("http://ls:8080", "k")
    assert server.labelstudio.config.choices_control == ls.config.choices_control == "c"
    assert (server.label_studio_url, server.api_key, server.config) == (ls.url, ls.api_key, server.labelstudio.config)
