"""Reading labeling configs: classes, brush labels, negatives, review choice, clear errors."""

from __future__ import annotations

import pytest

from axx_backend.core.settings import Settings
from axx_backend.labelstudio.config import ConfigCache, ConfigError, ConfigOptions, parse_config
from axx_backend.server.settings import ServerSettings

NEG = ConfigOptions(is_negative=Settings().is_negative)

GOOD = """<View>
  <Image name="img" value="$photo"/>
  <Choices name="diagnosis" toName="img">
    <Choice value="Lesion"/><Choice value="Healthy"/><Choice value="Needs review"/>
  </Choices>
  <BrushLabels name="lesion" toName="img"><Label value="Lesion" background="red"/></BrushLabels>
</View>"""


def test_good_config() -> None:
    cfg = parse_config(GOOD, NEG)
    assert (cfg.image, cfg.image_key, cfg.choices, cfg.brush) == ("img", "photo", "diagnosis", "lesion")
    assert cfg.classes == ("Lesion", "Healthy")
    assert dict(cfg.brush_map) == {"Lesion": "Lesion"}
    assert cfg.negatives == frozenset({"Healthy"})
    assert (cfg.review_control, cfg.review_choice) == ("diagnosis", "Needs review")
    assert cfg.notes is None
    assert cfg.class_mismatch(["Healthy", "Lesion"]) is None
    assert "does not know ['Healthy']" in (cfg.class_mismatch(["Lesion", "Other"]) or "")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (GOOD.replace("BrushLabels", "PolygonLabels"), "<BrushLabels>"),
        (GOOD.replace("Choices", "Labels").replace("Choice ", "Label "), "<Choices>"),
        (GOOD.replace('<Image name="img" value="$photo"/>', '<Text name="img" value="$photo"/>'), "<Image>"),
        ("", "empty"),
        ("<View><Image", "cannot be parsed"),
    ],
)
def test_unservable_config_names_the_missing_tag(config: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(config, NEG)


def test_choices_with_a_single_class_is_refused() -> None:
    config = GOOD.replace('<Choice value="Healthy"/>', "")
    with pytest.raises(ConfigError, match="at least two class values"):
        parse_config(config, NEG)


def test_positive_class_without_brush_label_is_an_error_until_mapped() -> None:
    config = GOOD.replace('<Choice value="Healthy"/>', '<Choice value="Healthy"/><Choice value="Tumor"/>')
    with pytest.raises(ConfigError, match=r"no <Label value=\"Tumor\"/>.*AXX_BRUSH_LABELS=Tumor="):
        parse_config(config, NEG)
    cfg = parse_config(config, ConfigOptions(brush_map={"Tumor": "Lesion"}, is_negative=NEG.is_negative))
    assert dict(cfg.brush_map) == {"Lesion": "Lesion", "Tumor": "Lesion"}
    cfg = parse_config(config, ConfigOptions(brush_map={"Tumor": ""}, is_negative=NEG.is_negative))
    assert dict(cfg.brush_map) == {"Lesion": "Lesion"}  # "" = explicitly no mask
    with pytest.raises(ConfigError, match="has only"):
        parse_config(config, ConfigOptions(brush_map={"Tumor": "Nope"}, is_negative=NEG.is_negative))
    with pytest.raises(ConfigError, match="not values of"):
        parse_config(config, ConfigOptions(brush_map={"Ghost": "Lesion"}, is_negative=NEG.is_negative))


def test_explicit_brush_label_with_another_name() -> None:
    config = GOOD.replace('<Label value="Lesion" background="red"/>', '<Label value="Lesion area"/>')
    with pytest.raises(ConfigError, match="Lesion area"):
        parse_config(config, NEG)
    cfg = parse_config(config, ConfigOptions(brush_map={"Lesion": "Lesion area"}, is_negative=NEG.is_negative))
    assert dict(cfg.brush_map) == {"Lesion": "Lesion area"}


def test_negative_classes_from_settings_get_no_brush_label() -> None:
    options = ConfigOptions(is_negative=Settings(negative_classes=("Healthy", "Lesion")).is_negative)
    cfg = parse_config(GOOD, options)
    assert dict(cfg.brush_map) == {} and cfg.negatives == {"Healthy", "Lesion"}


def test_review_choice_variants() -> None:
    no_review = GOOD.replace('<Choice value="Needs review"/>', "")
    cfg = parse_config(no_review, NEG)
    assert cfg.review_choice is None and cfg.classes == ("Lesion", "Healthy")

    separate = no_review.replace(
        "</View>", '<Choices name="qa" toName="img"><Choice value="Uncertain"/></Choices></View>'
    )
    cfg = parse_config(separate, NEG)
    assert (cfg.review_control, cfg.review_choice) == ("qa", "Uncertain")

    custom = GOOD.replace("Needs review", "Ask a doctor")
    cfg = parse_config(custom, ConfigOptions(brush_map={"Ask a doctor": ""}))
    assert cfg.review_choice is None and "Ask a doctor" in cfg.classes  # not recognised by name: a class
    opts = ConfigOptions(review_choice="Ask a doctor", is_negative=NEG.is_negative)
    cfg = parse_config(custom, opts)
    assert cfg.review_choice == "Ask a doctor" and cfg.classes == ("Lesion", "Healthy")

    off = parse_config(GOOD, ConfigOptions(review_choice="none", brush_map={"Needs review": ""}))
    assert off.review_choice is None and "Needs review" in off.classes
    with pytest.raises(ConfigError, match="AXX_REVIEW_CHOICE=Missing"):
        parse_config(GOOD, ConfigOptions(review_choice="Missing", is_negative=NEG.is_negative))


def test_alias_is_what_label_studio_stores() -> None:
    config = GOOD.replace('<Choice value="Needs review"/>', '<Choice value="Needs review" alias="review"/>')
    cfg = parse_config(config, NEG)
    assert cfg.review_choice == "review"


def test_notes_textarea_and_explicit_controls() -> None:
    config = GOOD.replace("</View>", '<TextArea name="why" toName="img"/></View>')
    assert parse_config(config, NEG).notes == "why"
    assert parse_config(config, ConfigOptions(notes_control="none")).notes is None
    with pytest.raises(ConfigError, match="AXX_NOTES_TEXTAREA=other"):
        parse_config(config, ConfigOptions(notes_control="other"))
    two = GOOD.replace(
        "</View>",
        '<Choices name="severity" toName="img"><Choice value="Mild"/><Choice value="Severe"/></Choices>'
        '<BrushLabels name="mask2" toName="img"><Label value="Mild"/><Label value="Severe"/></BrushLabels></View>',
    )
    assert parse_config(two, NEG).choices == "diagnosis"  # the first Choices with classes
    cfg = parse_config(two, ConfigOptions(choices_control="severity", brush_control="mask2"))
    assert (cfg.choices, cfg.brush, cfg.classes) == ("severity", "mask2", ("Mild", "Severe"))
    with pytest.raises(ConfigError, match="AXX_CHOICES_CONTROL=nope"):
        parse_config(two, ConfigOptions(choices_control="nope"))
    with pytest.raises(ConfigError, match="AXX_BRUSH_CONTROL=nope"):
        parse_config(two, ConfigOptions(brush_control="nope"))


def test_cache_parses_once_and_keeps_errors_clear() -> None:
    cache = ConfigCache(NEG)
    assert cache.get(GOOD) is cache.get(GOOD)
    bad = GOOD.replace("BrushLabels", "PolygonLabels")
    for _ in range(3):
        with pytest.raises(ConfigError, match="<BrushLabels>"):
            cache.get(bad)


def test_server_settings_read_the_config_options_from_env() -> None:
    env = {
        "AXX_BRUSH_LABELS": "Tumor=Lesion, Scar=",
        "AXX_REVIEW_CHOICE": "Ask",
        "AXX_ALLOWED_HOSTS": "a.example:81, b.example",
        "MODEL_DIR": "/m",
        "AXX_PREDICT_TIME_BUDGET": "12.5",
        "THREADS": "3",
    }
    s = ServerSettings.from_env(env)
    assert dict(s.config.brush_map) == {"Tumor": "Lesion", "Scar": ""}
    assert s.config.review_choice == "Ask"
    assert s.allowed_hosts == ("a.example:81", "b.example")
    assert (s.model_dir, s.predict_time_budget, s.threads, s.workers) == ("/m", 12.5, 3, 1)
    with pytest.raises(ConfigError):
        ServerSettings.from_env({"AXX_BRUSH_LABELS": "nonsense"})
    with pytest.raises(ValueError, match="THREADS"):
        ServerSettings.from_env({"THREADS": "many"})
