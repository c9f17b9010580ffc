"""The review queue as Data Manager tabs, through Label Studio 1.23's views API (`/api/dm/views`).

Four tabs, found again by title and updated in place (a second run creates nothing; duplicates of a title, e.g.
from two runs at once, are removed):

- "AXX: needs review": tasks whose newest prediction from this backend is flagged, least confident first;
- "AXX: least confident first": predicted tasks without an annotation, by prediction score ascending (what the
  score carries is `AXX_SCORE`'s choice, `results.task_score`);
- "AXX: draw masks next": the tasks `axx-backend select` picks for a pixel annotation;
- "AXX: check these labels": annotations the label check contradicts.

The Data Manager filters on task columns (ids, counts, prediction score) and task data, not on a prediction's
meta nor on a list the backend computed. So:
- with `AXX_TASK_FIELDS=true` the backend writes the reserved keys `TASK_FIELDS` into task data (those keys only,
  on the data as stored: storage URLs are read unresolved, `resolve_uri=false`) and the tabs filter and sort on
  them, for any number of tasks;
- otherwise nothing in a task is written and a tab lists task ids, the `MAX_LISTED` most urgent.

The label check's score also goes into the `mislabeling` field of each checked task's newest prediction (Label
Studio's own field on predictions, a float; Label Studio keeps it only when set through the predictions API,
not from a `/predict` answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .client import LabelStudioClient, LabelStudioError

log = logging.getLogger(__name__)

NEEDS_REVIEW = "AXX: needs review"
LEAST_CONFIDENT = "AXX: least confident first"
DRAW_MASKS = "AXX: draw masks next"
CHECK_LABELS = "AXX: check these labels"
TITLES = (NEEDS_REVIEW, LEAST_CONFIDENT, DRAW_MASKS, CHECK_LABELS)

# The task data keys the backend owns when AXX_TASK_FIELDS=true; no other key of a task is ever written.
FLAGGED, UNCERTAINTY, MASK_RANK, LABEL_CHECK = "axx_flagged", "axx_uncertainty", "axx_mask_rank", "axx_label_check"
TASK_FIELDS = (FLAGGED, UNCERTAINTY, MASK_RANK, LABEL_CHECK)
MAX_LISTED = 100  # tasks a tab lists by id (without task fields): one filter row each in the Data Manager
NO_TASK = 0  # a task id that never exists: the filter of a tab that lists nothing
TASK_INCLUDE = "id,data,predictions,total_annotations"  # what the review reads of each task


@dataclass(frozen=True)
class PredictionState:
    """The newest prediction of this backend on a task (one whose regions carry `meta.axx`)."""

    id: int
    flagged: bool
    confidence: float  # ensemble confidence, whatever the prediction's score carries
    mislabeling: float


@dataclass
class ReviewState:
    """What the tabs show, by task id."""

    predictions: dict[int, PredictionState] = field(default_factory=dict)
    mask_rank: dict[int, int] = field(default_factory=dict)  # draw masks next: 1 first
    label_check: dict[int, float] = field(default_factory=dict)  # contradicted annotations: score
    mislabeling: dict[int, float] = field(default_factory=dict)  # every checked annotation: score

    def flagged(self) -> list[int]:
        """Flagged tasks, least confident first."""
        flagged = [(p.confidence, t) for t, p in self.predictions.items() if p.flagged]
        return [t for _, t in sorted(flagged)]


def newest_prediction(task: dict[str, Any]) -> PredictionState | None:
    """The task's newest prediction made by this backend, or None."""
    ours = [(p, meta) for p in task.get("predictions") or [] if (meta := _axx_meta(p)) is not None]
    if not ours:
        return None
    pred, meta = max(ours, key=lambda pm: (str(pm[0].get("created_at") or ""), int(pm[0].get("id") or 0)))
    return PredictionState(
        id=int(pred["id"]),
        flagged=bool(meta.get("flagged")),
        confidence=float(meta.get("score", pred.get("score") or 0.0)),
        mislabeling=float(pred.get("mislabeling") or 0.0),
    )


def _axx_meta(prediction: dict[str, Any]) -> dict[str, Any] | None:
    for region in prediction.get("result") or []:
        axx = ((region or {}).get("meta") or {}).get("axx") if isinstance(region, dict) else None
        if isinstance(axx, dict):
            return axx
    return None


def prediction_states(tasks: list[dict[str, Any]]) -> dict[int, PredictionState]:
    return {int(t["id"]): state for t in tasks if (state := newest_prediction(t)) is not None}


# --- tab definitions --------------------------------------------------------------------------------------------------
def _item(column: str, operator: str, kind: str, value: Any) -> dict[str, Any]:
    return {"filter": f"filter:tasks:{column}", "operator": operator, "type": kind, "value": value}


def _ids(ids: list[int]) -> dict[str, Any]:
    """Filters that list these task ids (OR), or none at all."""
    listed = ids[:MAX_LISTED] or [NO_TASK]
    return {"conjunction": "or", "items": [_item("id", "equal", "Number", int(i)) for i in listed]}


def _data(title: str, filters: dict[str, Any], ordering: list[str], numeric: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"title": title, "type": "list", "target": "tasks", "filters": filters,
                            "ordering": ordering}  # fmt: skip
    if numeric:  # sort a data field as a number, not as text ("10" after "9")
        data["columnsDisplayType"] = {f"tasks:data.{numeric}": "Number"}
    return data


def tab_definitions(state: ReviewState, task_fields: bool) -> list[dict[str, Any]]:
    """The `data` of each review tab (title, filters, ordering), by task fields or by task ids."""
    unannotated = {"conjunction": "and", "items": [
        _item("total_predictions", "greater", "Number", 0), _item("total_annotations", "equal", "Number", 0),
    ]}  # fmt: skip
    least = _data(LEAST_CONFIDENT, unannotated, ["tasks:predictions_score"])
    if task_fields:
        return [
            _data(NEEDS_REVIEW, {"conjunction": "and", "items": [_item(f"data.{FLAGGED}", "equal", "Number", 1)]},
                  ["tasks:predictions_score"]),
            least,
            _data(DRAW_MASKS, {"conjunction": "and", "items": [_item(f"data.{MASK_RANK}", "greater", "Number", 0)]},
                  [f"tasks:data.{MASK_RANK}"], MASK_RANK),
            _data(CHECK_LABELS, {"conjunction": "and", "items": [_item(f"data.{LABEL_CHECK}", "greater", "Number", 0)]},
                  [f"-tasks:data.{LABEL_CHECK}"], LABEL_CHECK),
        ]  # fmt: skip
    ranked = sorted(state.mask_rank, key=lambda t: state.mask_rank[t])
    suspects = sorted(state.label_check, key=lambda t: (-state.label_check[t], t))
    return [
        _data(NEEDS_REVIEW, _ids(state.flagged()), ["tasks:predictions_score"]),
        least,
        _data(DRAW_MASKS, _ids(ranked), ["tasks:id"]),
        _data(CHECK_LABELS, _ids(suspects), ["tasks:id"]),
    ]


# --- writing tabs -----------------------------------------------------------------------------------------------------
def list_views(client: LabelStudioClient, project: int | str) -> list[dict[str, Any]]:
    return list(client.json("GET", "/api/dm/views", params={"project": project}) or [])


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    """What of a view's data this module sets, in the form Label Studio answers it."""
    filters = data.get("filters") or {}
    items = [{k: i.get(k) for k in ("filter", "operator", "type", "value")} for i in filters.get("items") or []]
    return {
        "title": data.get("title"),
        "conjunction": filters.get("conjunction"),
        "items": items,
        "ordering": list(data.get("ordering") or []),
        "display": data.get("columnsDisplayType") or {},
    }


def sync_tabs(client: LabelStudioClient, project: int | str, tabs: list[dict[str, Any]]) -> dict[str, Any]:
    """Create or update each tab by title; returns {title: {"id", "action"}} and the duplicates removed."""
    existing: dict[str, list[dict[str, Any]]] = {}
    for view in sorted(list_views(client, project), key=lambda v: int(v["id"])):
        existing.setdefault(str((view.get("data") or {}).get("title")), []).append(view)
    out: dict[str, Any] = {"tabs": {}, "removed_duplicates": []}
    for data in tabs:
        views = existing.get(data["title"], [])
        body = {"project": int(project), "data": data}
        if not views:
            made = client.json("POST", "/api/dm/views", json=body)
            out["tabs"][data["title"]] = {"id": int(made["id"]), "action": "created"}
            continue
        keep = views[0]
        if _comparable(keep.get("data") or {}) == _comparable(data):
            action = "unchanged"
        else:
            client.json("PATCH", f"/api/dm/views/{keep['id']}", json=body)
            action = "updated"
        out["tabs"][data["title"]] = {"id": int(keep["id"]), "action": action}
        for duplicate in views[1:]:
            client.json("DELETE", f"/api/dm/views/{duplicate['id']}")
            out["removed_duplicates"].append(int(duplicate["id"]))
    return out


# --- writing task data and predictions --------------------------------------------------------------------------------
def task_field_values(state: ReviewState) -> dict[int, dict[str, Any]]:
    """The reserved keys each task should carry (a key absent here is removed from the task's data)."""
    values: dict[int, dict[str, Any]] = {}
    for task, pred in state.predictions.items():
        values.setdefault(task, {})[FLAGGED] = int(pred.flagged)  # 1 / 0: the Data Manager filters numbers
        values[task][UNCERTAINTY] = round(1.0 - pred.confidence, 4)
    for task, rank in state.mask_rank.items():
        values.setdefault(task, {})[MASK_RANK] = int(rank)
    for task, score in state.label_check.items():
        values.setdefault(task, {})[LABEL_CHECK] = round(float(score), 4)
    return values


def write_task_fields(client: LabelStudioClient, tasks: list[dict[str, Any]], state: ReviewState) -> int:
    """PATCH the data of each task whose reserved keys differ from what they should be; other keys are sent back
    exactly as stored (`tasks` must come from a `raw_data` listing). Returns how many tasks were written."""
    wanted = task_field_values(state)
    written = 0
    for task in tasks:
        data = dict(task.get("data") or {})
        ours = {k: data[k] for k in TASK_FIELDS if k in data}
        target = wanted.get(int(task["id"]), {})
        if ours == target:
            continue
        kept = {k: v for k, v in data.items() if k not in TASK_FIELDS}
        written += _write(client, f"/api/tasks/{int(task['id'])}", {"data": {**kept, **target}})
    return written


def write_mislabeling(client: LabelStudioClient, state: ReviewState) -> int:
    """Set `mislabeling` on the newest prediction of each checked task (where it changed); returns how many."""
    written = 0
    for task, score in state.mislabeling.items():
        pred = state.predictions.get(task)
        if pred is None or abs(pred.mislabeling - score) < 1e-6:
            continue
        written += _write(client, f"/api/predictions/{pred.id}", {"mislabeling": round(float(score), 6)})
    return written


def _write(client: LabelStudioClient, path: str, body: dict[str, Any]) -> int:
    """PATCH one task or prediction; a refusal is logged and fails only that one (1 written, 0 not)."""
    try:
        client.json("PATCH", path, json=body)
    except LabelStudioError as exc:
        log.warning("PATCH %s refused: %s", path, exc)
        return 0
    return 1
