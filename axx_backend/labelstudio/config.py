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


def parse_config(label_config: str, options: ConfigOptions | None = None) -> ProjectConfig:
    """Find the Image, the class Choices, the BrushLabels (and optional review choice, notes TextArea)."""
    options = options or ConfigOptions()
    if not label_config or not label_config.strip():
        raise ConfigError("the labeling config is empty")
    try:
        li = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises several types for XML it cannot parse
        raise ConfigError(f"the labeling config cannot be parsed: {exc}") from exc

    images = [o for o in li.objects if getattr(o, "tag", "") == "Image"]
    if not images:
        raise ConfigError('the labeling config has no <Image> tag: add <Image name="image" value="$image"/>')
    controls = list(li.controls)

    review_re = re.compile(DEFAULT_REVIEW_PATTERN, re.IGNORECASE)
    explicit_review = options.review_choice
    review_off = explicit_review is not None and explicit_review.strip().lower() in DISABLED

    def is_review(stored: str, visible: str) -> bool:
        if review_off:
            return False
        if explicit_review is not None:
            return explicit_review in (stored, visible)
        return bool(review_re.match(visible) or review_re.match(stored))

    # --- the class control -----------------------------------------------------------------------------------
    choices_controls = [c for c in controls if _tag(c) == "Choices" and _on_image(c)]
    if options.choices_control:
        named = [c for c in choices_controls if c.name == options.choices_control]
        if not named:
            raise ConfigError(
                f"AXX_CHOICES_CONTROL={options.choices_control}: the labeling config has no <Choices "
                f'name="{options.choices_control}"> connected to an <Image>'
            )
        choices_controls = named
    candidates = [c for c in choices_controls if len([v for v in _choice_values(c) if not is_review(*v)]) >= 2]
    if not candidates:
        if choices_controls:
            raise ConfigError(
                f'<Choices name="{choices_controls[0].name}"> needs at least two class values (besides a review '
                "choice) for the backend to predict"
            )
        raise ConfigError(
            "the labeling config has no <Choices> control connected to the <Image> "
            f'(e.g. <Choices name="class" toName="{images[0].name}"><Choice value="Lesion"/>'
            '<Choice value="Healthy"/></Choices>): the backend needs it for the image classes'
        )
    choices = candidates[0]
    image = _on_image(choices)[0]
    classes = tuple(stored for stored, visible in _choice_values(choices) if not is_review(stored, visible))

    # --- review choice: in the class control, or in another Choices control on the same image ------------------
    review_control = review_choice = None
    for control in [choices] + [c for c in controls if _tag(c) == "Choices" and c is not choices]:
        if image.name not in (control.to_name or []):
            continue
        hits = [stored for stored, visible in _choice_values(control) if is_review(stored, visible)]
        if hits:
            review_control, review_choice = control.name, hits[0]
            break
    if explicit_review is not None and not review_off and review_choice is None:
        raise ConfigError(
            f'AXX_REVIEW_CHOICE={explicit_review}: no <Choice value="{explicit_review}"> in a <Choices> '
            f'connected to <Image name="{image.name}">'
        )

    # --- brush control and the class -> brush label map ---------------------------------------------------------
    brushes = [c for c in controls if _tag(c) == "BrushLabels" and image.name in (c.to_name or [])]
    if options.brush_control:
        brushes = [c for c in brushes if c.name == options.brush_control]
        if not brushes:
            raise ConfigError(
                f"AXX_BRUSH_CONTROL={options.brush_control}: the labeling config has no <BrushLabels "
                f'name="{options.brush_control}" toName="{image.name}">'
            )
    if not brushes:
        raise ConfigError(
            f'the labeling config has no <BrushLabels> control connected to <Image name="{image.name}"> '
            f'(e.g. <BrushLabels name="mask" toName="{image.name}"><Label value="Lesion"/></BrushLabels>): '
            "the backend needs it for the masks"
        )
    brush = brushes[0]
    brush_values = _choice_values(brush)
    brush_labels = tuple(stored for stored, _ in brush_values)
    by_visible = {visible: stored for stored, visible in brush_values}

    negatives = frozenset(c for c in classes if options.is_negative(c))
    unknown = [c for c in options.brush_map if c not in classes]
    if unknown:
        raise ConfigError(
            f'AXX_BRUSH_LABELS names classes {unknown} that are not values of <Choices name="{choices.name}">'
        )
    brush_map: dict[str, str] = {}
    for cls in classes:
        if cls in options.brush_map:
            label = options.brush_map[cls]
            if not label:
                continue  # explicitly no mask for this class
            if label not in brush_labels and label not in by_visible:
                raise ConfigError(
                    f'AXX_BRUSH_LABELS maps {cls!r} to {label!r}, but <BrushLabels name="{brush.name}"> has only '
                    f"{list(brush_labels)}"
                )
            brush_map[cls] = by_visible.get(label, label)
        elif cls in negatives:
            continue
        elif cls in brush_labels or cls in by_visible:
            brush_map[cls] = by_visible.get(cls, cls)
        else:
            raise ConfigError(
                f'<BrushLabels name="{brush.name}"> has no <Label value="{cls}"/> for the positive class {cls!r} '
                f"(it has {list(brush_labels)}): add the label, or map the class with "
                f"AXX_BRUSH_LABELS={cls}=<label> (an empty label means no mask)"
            )

    # --- optional explanation TextArea ---------------------------------------------------------------------------
    notes = None
    notes_opt = options.notes_control
    if notes_opt is None or notes_opt.strip().lower() not in DISABLED:
        areas = [c for c in controls if _tag(c) == "TextArea" and image.name in (c.to_name or [])]
        if notes_opt is not None:
            areas = [c for c in areas if c.name == notes_opt]
            if not areas:
                raise ConfigError(
                    f'AXX_NOTES_TEXTAREA={notes_opt}: no <TextArea name="{notes_opt}" toName="{image.name}">'
                )
        notes = areas[0].name if areas else None

    return ProjectConfig(
        image=image.name,
        image_key=image.value_name or image.name,
        choices=choices.name,
        classes=classes,
        brush=brush.name,
        brush_labels=brush_labels,
        brush_map=brush_map,
        negatives=negatives,
        review_control=review_control,
        review_choice=review_choice,
        notes=notes,
        interface=li,
    )


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
