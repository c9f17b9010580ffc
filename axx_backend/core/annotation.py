"""What the engine says about one image: the `Annotation` the CLI, Label Studio I/O and evaluation read.

Torch-free (numpy only), so the web and Label Studio layers can build predictions without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MemberResult:
    name: str
    probs: list[float]
    label: str
    entropy: float  # normalised predictive entropy, 0..1
    mutual_info: float  # BALD, normalised by log C
    std_top: float
    uncertain: bool
    agrees: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "probs": [round(p, 6) for p in self.probs],
            "label": self.label,
            "entropy": round(self.entropy, 6),
            "mutual_info": round(self.mutual_info, 6),
            "std_top": round(self.std_top, 6),
            "uncertain": self.uncertain,
            "agrees": self.agrees,
        }


@dataclass
class Annotation:
    """What the ensemble says about one image; Label Studio I/O and the CLI consume it."""

    label: str  # ensemble class (majority of confident members; ensemble argmax when flagged)
    probs: dict[str, float]  # mean of the members' MC-mean probabilities
    score: float  # ensemble confidence = 1 - normalised entropy of `probs` (low = uncertain)
    class_score: float  # mean probability of `label` over the agreeing members
    flagged: bool  # needs expert review: no mask
    reason: str
    members: list[MemberResult]
    width: int
    height: int
    mask: np.ndarray | None = None  # uint8 {0, 1} [height, width]; None when flagged or negative class
    mask_source: str | None = None  # e.g. "cam:mean", "cam:intersection"
    heat: np.ndarray | None = field(default=None, repr=False)  # fused map in [0, 1], for overlays

    @property
    def mask_area(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "score": round(self.score, 6),
            "class_score": round(self.class_score, 6),
            "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "flagged": self.flagged,
            "reason": self.reason,
            "members": [m.to_dict() for m in self.members],
            "mask_area": self.mask_area,
            "mask_source": self.mask_source,
            "width": self.width,
            "height": self.height,
        }
