"""Read a Label Studio labeling config: which tags the backend writes to, and which classes it predicts.

The backend serves a config with one `<Image>`, a `<Choices>` control on it (the classes) and a
`<BrushLabels>` control on it (the masks). Each positive class maps to a brush label (the same name, or
an explicit mapping); negative classes get no mask. Optional: a review choice set on flagged images
(e.g. "Needs review", in the class control or in a second Choices control) and a `<TextArea>` that
receives a short explanation of the decision. A config the backend cannot serve raises `ConfigError`
naming the missing tag, so `/setup` can tell the user what to add.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from ..core.settings import Settings

# Choice values that mean "a person should look at this" (case-insensitive, whole value).
DEFAULT_REVIEW_PATTERN = r"^\s*(needs?[ _-]?review|to[ _-]?review|review|uncertain|unsure|not[ _-]?sure|flagged)\s*$"
DISABLED = ("", "none", "off", "false", "0")


class ConfigError(ValueError):
    """The labeling config cannot be served; the message names the missing or wrong tag."""


@dataclass(frozen=True)
class ConfigOptions:
    """How to read a config; all optional (names are tag `name` attributes, values are Choice/Label values)."""

    choices_control: str | None = None  # AXX_CHOICES_CONTROL: which <Choices> holds the classes
    brush_control: str | None = None  # AXX_BRUSH_CONTROL: which <BrushLabels> receives masks
    brush_map: Mapping[str, str] = field(default_factory=dict)  # AXX_BRUSH_LABELS "Class=Label,...", "" = no mask
    review_choice: str | None = None  # AXX_REVIEW_CHOICE: a Choice value; None = detect by name; "none" = off
    notes_control: str | None = None  # AXX_NOTES_TEXTAREA: a <TextArea> name; None = first on the image; "none"
    is_negative: Callable[[str], bool] = Settings().is_negative  # classes that get no mask ("Healthy", ...)

    @staticmethod
    def parse_brush_map(raw: str | None) -> dict[str, str]:
        """'Lesion=Lesion area, Scar=' -> {'Lesion': 'Lesion area', 'Scar': ''}."""
        mapping: dict[str, str] = {}
        for item in (raw or "").split(","):
            if not item.strip():
                continue
            if "=" not in item:
                raise ConfigError(f"AXX_BRUSH_LABELS item {item.strip()!r} is not 'Class=BrushLabel'")
            cls, label = item.split("=", 1)
            mapping[cls.strip()] = label.strip()
        return mapping


@dataclass(frozen=True)
class ProjectConfig:
    """What the backend writes for one labeling config (names are the config's tag names)."""

    image: str  # <Image name>: the `to_name` of every result
    image_key: str  # task data key of the image ("image" for value="$image")
    choices: str  # <Choices name> of the classes
    classes: tuple[str, ...]  # its values, review choice excluded (Choice alias when set: that is what LS stores)
    brush: str  # <BrushLabels name>
    brush_labels: tuple[str, ...]
    brush_map: Mapping[str, str]  # positive class -> brush label
    negatives: frozenset[str]  # classes that never get a mask
    review_control: str | None = None  # <Choices name> holding the review choice (may equal `choices`)
    review_choice: str | None = None
    notes: str | None = None  # <TextArea name> for the explanation
    interface: LabelInterface | None = field(default=None, compare=False, repr=False)

    def validate(self, prediction: dict[str, Any]) -> list[str]:
        """LabelInterface.validate_prediction errors ([] when valid); LS stores wrong names silently."""
        if self.interface is None:
            return []
        return list(self.interface.validate_prediction(prediction, return_errors=True))

    def class_mismatch(self, model_classes: list[str] | tuple[str, ...]) -> str | None:
        """Why a model with these classes cannot serve this config, or None when it can."""
        if set(model_classes) == set(self.classes):
            return None
        missing = [c for c in self.classes if c not in model_classes]
        extra = [c for c in model_classes if c not in self.classes]
        parts = []
        if missing:
            parts.append(f"the model does not know {missing}")
        if extra:
            parts.append(f"the config has no choice for {extra}")
        return (
            f'model classes {list(model_classes)} do not match the <Choices name="{self.choices}"> values '
            f"{list(self.classes)}: " + "; ".join(parts)
        )


def _choice_values(control: Any) -> list[tuple[str, str]]:
    """(stored value, visible value) of each Choice/Label: LS stores the alias when one is set."""
    out = []
    for stored in control.labels or []:
        attrs = getattr((control.labels_attrs or {}).get(stored), "attr", {}) or {}
        out.append((stored, str(attrs.get("value", stored))))
    return out


def _tag(control: Any) -> str:
    return str(control.tag)


def _on_image(control: Any) -> list[Any]:
    return [o for o in (control.objects or []) if getattr(o, "tag", "") == "Image"]


class ReviewRule:
    """Which Choice values mean "a person should look at this": `AXX_REVIEW_CHOICE` when set ("none" turns
    the review choice off), else values named like "Needs review" (`DEFAULT_REVIEW_PATTERN`)."""

    def __init__(self, explicit: str | None) -> None:
        self.explicit = explicit
        self.off = explicit is not None and explicit.strip().lower() in DISABLED
        self.pattern = re.compile(DEFAULT_REVIEW_PATTERN, re.IGNORECASE)

    def __call__(self, stored: str, visible: str) -> bool:
        if self.off:
            return False
        if self.explicit is not None:
            return self.explicit in (stored, visible)
        return bool(self.pattern.match(visible) or self.pattern.match(stored))


def parse_config(label_config: str, options: ConfigOptions | None = None) -> ProjectConfig:
    """Find the Image, the class Choices, the BrushLabels (and optional review choice, notes TextArea)."""
    options = options or ConfigOptions()
    li = _interface(label_config)
    controls = list(li.controls)
    is_review = ReviewRule(options.review_choice)
    choices = _class_control(li, controls, options.choices_control, is_review)
    image = _on_image(choices)[0]
    classes = tuple(stored for stored, visible in _choice_values(choices) if not is_review(stored, visible))
    review_control, review_choice = _review_choice(controls, choices, image, is_review)
    brush = _brush_control(controls, image, options.brush_control)
    negatives = frozenset(c for c in classes if options.is_negative(c))
    return ProjectConfig(
        image=image.name,
        image_key=image.value_name or image.name,
        choices=choices.name,
        classes=classes,
        brush=brush.name,
        brush_labels=tuple(stored for stored, _ in _choice_values(brush)),
        brush_map=_brush_map(classes, negatives, brush, choices.name, options.brush_map),
        negatives=negatives,
        review_control=review_control,
        review_choice=review_choice,
        notes=_notes_control(controls, image, options.notes_control),
        interface=li,
    )


def _interface(label_config: str) -> LabelInterface:
    """The SDK's view of the config, with an `<Image>`; errors say what is wrong."""
    if not label_config or not label_config.strip():
        raise ConfigError("the labeling config is empty")
    try:
        li = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises several types for XML it cannot parse
        raise ConfigError(f"the labeling config cannot be parsed: {exc}") from exc
    if not any(getattr(o, "tag", "") == "Image" for o in li.objects):
        raise ConfigError('the labeling config has no <Image> tag: add <Image name="image" value="$image"/>')
    return li


def _class_control(li: LabelInterface, controls: list[Any], name: str | None, is_review: ReviewRule) -> Any:
    """The `<Choices>` of the classes: the first on an Image with two class values (or the one named)."""
    on_image = [c for c in controls if _tag(c) == "Choices" and _on_image(c)]
    if name:
        on_image = [c for c in on_image if c.name == name]
        if not on_image:
            raise ConfigError(
                f'AXX_CHOICES_CONTROL={name}: the labeling config has no <Choices name="{name}"> connected to an '
                "<Image>"
            )
    candidates = [c for c in on_image if len([v for v in _choice_values(c) if not is_review(*v)]) >= 2]
    if candidates:
        return candidates[0]
    if on_image:
        raise ConfigError(
            f'<Choices name="{on_image[0].name}"> needs at least two class values (besides a review '
            "choice) for the backend to predict"
        )
    image = next(o for o in li.objects if getattr(o, "tag", "") == "Image")
    raise ConfigError(
        "the labeling config has no <Choices> control connected to the <Image> "
        f'(e.g. <Choices name="class" toName="{image.name}"><Choice value="Lesion"/>'
        '<Choice value="Healthy"/></Choices>): the backend needs it for the image classes'
    )


def _review_choice(
    controls: list[Any], choices: Any, image: Any, is_review: ReviewRule
) -> tuple[str | None, str | None]:
    """(control, value) of the review choice: in the class control, or in another Choices on the same image."""
    for control in [choices] + [c for c in controls if _tag(c) == "Choices" and c is not choices]:
        if image.name not in (control.to_name or []):
            continue
        hits = [stored for stored, visible in _choice_values(control) if is_review(stored, visible)]
        if hits:
            return control.name, hits[0]
    if is_review.explicit is not None and not is_review.off:
        raise ConfigError(
            f'AXX_REVIEW_CHOICE={is_review.explicit}: no <Choice value="{is_review.explicit}"> in a <Choices> '
            f'connected to <Image name="{image.name}">'
        )
    return None, None


def _brush_control(controls: list[Any], image: Any, name: str | None) -> Any:
    """The `<BrushLabels>` on the image that receives the masks (the first, or the one named)."""
    brushes = [c for c in controls if _tag(c) == "BrushLabels" and image.name in (c.to_name or [])]
    if name:
        brushes = [c for c in brushes if c.name == name]
        if not brushes:
            raise ConfigError(
                f'AXX_BRUSH_CONTROL={name}: the labeling config has no <BrushLabels name="{name}" '
                f'toName="{image.name}">'
            )
    if not brushes:
        raise ConfigError(
            f'the labeling config has no <BrushLabels> control connected to <Image name="{image.name}"> '
            f'(e.g. <BrushLabels name="mask" toName="{image.name}"><Label value="Lesion"/></BrushLabels>): '
            "the backend needs it for the masks"
        )
    return brushes[0]


def _brush_map(
    classes: tuple[str, ...], negatives: frozenset[str], brush: Any, choices: str, explicit: Mapping[str, str]
) -> dict[str, str]:
    """Positive class -> brush label: `AXX_BRUSH_LABELS` first ("" = no mask), else the label of the same
    name; negative classes get none. A positive class without a label is an error that says how to fix it."""
    brush_values = _choice_values(brush)
    brush_labels = [stored for stored, _ in brush_values]
    by_visible = {visible: stored for stored, visible in brush_values}
    unknown = [c for c in explicit if c not in classes]
    if unknown:
        raise ConfigError(f'AXX_BRUSH_LABELS names classes {unknown} that are not values of <Choices name="{choices}">')
    brush_map: dict[str, str] = {}
    for cls in classes:
        if cls in explicit:
            label = explicit[cls]
            if label and label not in brush_labels and label not in by_visible:
                raise ConfigError(
                    f'AXX_BRUSH_LABELS maps {cls!r} to {label!r}, but <BrushLabels name="{brush.name}"> has only '
                    f"{brush_labels}"
                )
            if label:  # "" = explicitly no mask for this class
                brush_map[cls] = by_visible.get(label, label)
        elif cls in brush_labels or cls in by_visible:
            if cls not in negatives:
                brush_map[cls] = by_visible.get(cls, cls)
        elif cls not in negatives:
            raise ConfigError(
                f'<BrushLabels name="{brush.name}"> has no <Label value="{cls}"/> for the positive class {cls!r} '
                f"(it has {brush_labels}): add the label, or map the class with "
                f"AXX_BRUSH_LABELS={cls}=<label> (an empty label means no mask)"
            )
    return brush_map


def _notes_control(controls: list[Any], image: Any, name: str | None) -> str | None:
    """The `<TextArea>` for the explanation: the first on the image, the one named, or none ("none")."""
    if name is not None and name.strip().lower() in DISABLED:
        return None
    areas = [c for c in controls if _tag(c) == "TextArea" and image.name in (c.to_name or [])]
    if name is not None:
        areas = [c for c in areas if c.name == name]
        if not areas:
            raise ConfigError(f'AXX_NOTES_TEXTAREA={name}: no <TextArea name="{name}" toName="{image.name}">')
    return areas[0].name if areas else None


class ConfigCache:
    """Parsed configs by content hash: /setup and /predict send the same XML over and over."""

    def __init__(self, options: ConfigOptions, size: int = 32) -> None:
        self.options = options
        self.size = size
        self._items: OrderedDict[str, ProjectConfig | ConfigError] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, label_config: str) -> ProjectConfig:
        key = hashlib.sha256((label_config or "").encode()).hexdigest()
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
        if hit is None:
            try:
                hit = parse_config(label_config, self.options)
            except ConfigError as exc:
                hit = exc
            with self._lock:
                self._items[key] = hit
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
        if isinstance(hit, ConfigError):
            raise ConfigError(str(hit))  # a fresh exception: re-raising the cached one would grow its traceback
        return hit
