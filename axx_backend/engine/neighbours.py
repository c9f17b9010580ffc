"""The nearest labelled image: a second reason to send an image to review (docs/METHOD.md "Prediction" 4).

An ensemble's members can all be sure and agree, and still be wrong together on an object unlike every
labelled image. What each member's features say is nearest among the labelled images is evidence the heads
do not use: where the nearest labelled image of at least `min_uncertain_to_flag` members shows another class
than the decided one, `decide` flags the image. On the photograph benchmark this ranked the unflagged errors
at AUROC 0.88 against 0.79 for the largest member entropy (README, "The flag budget").

A version keeps a bounded bank of its labelled images' pooled features (unit length, per member) and their
classes. Training calibrates the review threshold with this check on, so both kinds of flag together spend
the flag budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NEIGHBOURS_FILE = "neighbours.safetensors"
# Query rows compared with the bank at once: bounds the similarity matrix's memory (rows x bank images).
_CHUNK = 256


@dataclass
class NeighbourBank:
    """Per member, unit-length pooled features [N, K_m] of N labelled images, their classes [N], and the
    training rows they came from [N] (calibration leaves an image's own row out)."""

    features: list[torch.Tensor]
    labels: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device) -> NeighbourBank:
        return NeighbourBank([f.to(device) for f in self.features], self.labels, self.rows)

    @torch.inference_mode()
    def nearest_classes(self, pooled: Sequence[torch.Tensor], exclude_rows: Sequence[int] | None = None) -> np.ndarray:
        """[M, B]: for each member m and query b, the class of the bank image whose features are the most
        cosine-similar to `pooled[m][b]`; `exclude_rows[b]`: a training row that query b may not match (itself)."""
        if len(pooled) != len(self.features):
            raise ValueError(f"{len(pooled)} members' features for a bank of {len(self.features)} members")
        n = int(pooled[0].shape[0]) if pooled else 0
        out = np.zeros((len(self.features), n), dtype=np.int64)
        labels = self.labels.numpy()
        for m, (bank, query) in enumerate(zip(self.features, pooled, strict=True)):
            for start in range(0, n, _CHUNK):
                q = F.normalize(query[start : start + _CHUNK].float().to(bank.device), dim=1)
                similarity = q @ bank.T  # [b, N]
                if exclude_rows is not None:
                    own = torch.as_tensor(list(exclude_rows[start : start + _CHUNK]), device=bank.device)
                    similarity[own[:, None] == self.rows.to(bank.device)[None, :]] = -float("inf")
                out[m, start : start + len(q)] = labels[similarity.argmax(dim=1).cpu().numpy()]
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the version stores (safetensors): features in float16 (half the bytes; the nearest image of a
        unit vector does not turn on the fourth digit)."""
        out = {f"member{m}": f.detach().cpu().half().contiguous() for m, f in enumerate(self.features)}
        out["labels"] = self.labels.cpu().contiguous()
        out["rows"] = self.rows.cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], members: int) -> NeighbourBank:
        names = [f"member{m}" for m in range(members)]
        missing = [k for k in (*names, "labels", "rows") if k not in tensors]
        if missing:
            raise ValueError(f"the neighbour bank lacks {', '.join(missing)}")
        features = [F.normalize(tensors[k].float(), dim=1) for k in names]
        labels, rows = tensors["labels"].long(), tensors["rows"].long()
        if any(f.shape[0] != labels.numel() for f in features) or rows.numel() != labels.numel():
            raise ValueError("the neighbour bank's features, classes and rows differ in length")
        return cls(features, labels, rows)


def build_bank(
    pooled: Sequence[torch.Tensor], labels: torch.Tensor, max_images: int, seed: int = 0
) -> NeighbourBank | None:
    """The bank of the labelled rows (`labels` >= 0) of `pooled` (per member [N, K]): all of them up to
    `max_images`, else a seeded random choice of about `max_images` / C per class (a class with fewer gives
    its room to none: every class keeps its share). None: fewer than two labelled rows or `max_images` 0."""
    labelled = torch.nonzero(labels >= 0).flatten()
    if len(labelled) < 2 or max_images <= 0:
        return None
    if len(labelled) > max_images:
        rng = np.random.default_rng(seed)
        classes = labels[labelled].numpy()
        per_class = max(1, max_images // len(np.unique(classes)))
        keep = [rng.permutation(np.flatnonzero(classes == c))[:per_class] for c in np.unique(classes)]
        labelled = labelled[torch.from_numpy(np.sort(np.concatenate(keep)))]
    features = [F.normalize(p[labelled].float(), dim=1) for p in pooled]
    return NeighbourBank(features, labels[labelled].long().clone(), labelled.long().clone())
