"""The review loop against a real Label Studio (1.23, from $AXX_LS_VENV): `axx-backend views` creates the four
Data Manager tabs once, "draw masks next" lists exactly the tasks `axx-backend select` picks, and a label
planted wrong among correct ones shows up in "check these labels" and in its prediction's `mislabeling`.

Tasks are URL tasks on a static server on 127.0.0.1; the version is the session's small offline-preset one
(tests/conftest.py), copied so the review cache it writes stays here. Predictions come from
`axx-backend preannotate --in-process`, as a user would make them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from axx_backend.core.synthetic import make_image
from axx_backend.labelstudio.views import CHECK_LABELS, DRAW_MASKS, LEAST_CONFIDENT, NEEDS_REVIEW, TASK_FIELDS, TITLES
from tests import ls_harness as h

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="diagnosis" toName="image" choice="single">
    <Choice value="Lesion"/><Choice value="Healthy"/><Choice value="Needs review"/>
  </Choices>
  <BrushLabels name="lesion" toName="image"><Label value="Lesion"/></BrushLabels>
</View>"""
K = 3
PLANTED = "healthy_planted.png"  # a Healthy image annotated "Lesion"


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> dict[str, Any]:
    """`axx-backend ARGS --json` in a subprocess; its JSON summary."""
    cmd = [str(Path(h.PYTHON).parent / "axx-backend"), *args, "--json"]
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _result(label: str, mask: np.ndarray | None = None) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = [{"from_name": "diagnosis", "to_name": "image", "type": "choices",
                                     "value": {"choices": [label]}}]  # fmt: skip
    if mask is not None:
        rle = [int(v) for v in mask2rle(np.where(mask, 255, 0).astype(np.uint8))]
        result.append({"from_name": "lesion", "to_name": "image", "type": "brushlabels",
                       "original_width": int(mask.shape[1]), "original_height": int(mask.shape[0]),
                       "value": {"format": "rle", "rle": rle, "brushlabels": ["Lesion"]}})  # fmt: skip
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, trained_model_dir: Path) -> Any:
    try:
        h.ls_venv()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    work = tmp_path_factory.mktemp("review")
    ls = h.LabelStudio(work).start()
    try:
        models = work / "models"
        shutil.copytree(trained_model_dir, models, symlinks=True)  # `current` stays a link
        static = work / "static"
        static.mkdir()
        rng = np.random.default_rng(5)
        tasks, names = [], []
        # 6 + 6 correct labels, one planted wrong, one Lesion with a drawn mask, 6 tasks without annotation
        plan = [("Lesion", "Lesion", False)] * 6 + [("Healthy", "Healthy", False)] * 6
        plan += [("Healthy", "Lesion", False), ("Lesion", "Lesion", True)]
        plan += [("Lesion", None, False)] * 4 + [("Healthy", None, False)] * 2
        for i, (truth, label, with_mask) in enumerate(plan):
            image, mask = make_image(rng, 128, truth == "Lesion")
            name = PLANTED if truth != label and label else f"{truth.lower()}_{i:02d}.png"
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            (static / name).write_bytes(buf.getvalue())
            names.append(name)
            tasks.append({"data": {"image": name, "note": f"keep {i}"}, "annotations": [
                {"result": _result(label, mask if with_mask else None)}] if label else []})  # fmt: skip
        ls.wait(timeout=180)
        pid = ls.create_project("AXX review", LABEL_CONFIG)
        with h.StaticServer(static) as st:
            for task in tasks:
                task["data"]["image"] = f"{st.url}/{task['data']['image']}"
            ls.import_tasks(pid, tasks)
            env = {
                "MODEL_DIR": str(models), "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.create_personal_access_token(),
                "AXX_ALLOWED_HOSTS": f"127.0.0.1:{st.port}", "AXX_SELECT_K": str(K), "AXX_BATCH_SIZE": "4",
                "HF_HUB_OFFLINE": "1",
            }  # fmt: skip
            pre = _cli(env, "preannotate", "--project", str(pid), "--in-process")
            assert pre["posted"] == len(tasks), pre
            ids = {Path(t["data"]["image"]).name: int(t["id"]) for t in ls.tasks(pid)}
            yield {"ls": ls, "project": pid, "env": env, "ids": ids, "static_url": st.url}
    finally:
        ls.stop()


def _views(ls: h.LabelStudio, project: int) -> dict[str, list[int]]:
    """{title: [view ids]} of the project's Data Manager tabs."""
    out: dict[str, list[int]] = {}
    for view in ls.api("GET", "/api/dm/views", params={"project": project}):
        out.setdefault(view["data"].get("title"), []).append(int(view["id"]))
    return out


def _listed(ls: h.LabelStudio, project: int, view: int) -> set[int]:
    """The task ids a tab lists, as the Data Manager asks for them."""
    data = ls.api("GET", "/api/tasks", params={"project": project, "view": view, "page_size": 1000})
    return {int(t["id"]) for t in data["tasks"]}


def test_views_creates_the_four_tabs_once(project: dict[str, Any]) -> None:
    ls, pid = project["ls"], project["project"]
    first = _cli(project["env"], "views", "--project", str(pid))
    assert {tab["action"] for tab in first["tabs"].values()} == {"created"}
    second = _cli(project["env"], "views", "--project", str(pid))
    assert {tab["action"] for tab in second["tabs"].values()} <= {"unchanged", "updated"}
    views = _views(ls, pid)
    for title in TITLES:
        assert len(views.get(title, [])) == 1, views
        assert views[title] == [first["tabs"][title]["id"]] == [second["tabs"][title]["id"]]
    assert second["selection"]["cached"] == len(project["ids"])  # the second run read every profile from disk
    # every task still has its own data and nothing else: no AXX_TASK_FIELDS, no write
    for task in ls.tasks(pid):
        assert set(task["data"]) == {"image", "note"}
    # "least confident first" lists the predicted tasks without an annotation, "needs review" the flagged ones
    assert len(_listed(ls, pid, views[LEAST_CONFIDENT][0])) == 6
    flagged = {int(p["task"]) for p in ls.predictions(pid) if any(
        (r.get("meta") or {}).get("axx", {}).get("flagged") for r in p["result"])}  # fmt: skip
    assert _listed(ls, pid, views[NEEDS_REVIEW][0]) == flagged
    assert second["flagged"] == len(flagged)


def test_draw_masks_next_lists_exactly_the_selected_tasks(project: dict[str, Any]) -> None:
    ls, pid, ids = project["ls"], project["project"], project["ids"]
    summary = _cli(project["env"], "views", "--project", str(pid))
    selected = _cli(project["env"], "select", "--project", str(pid), "-k", str(K))
    picked = [int(p["key"]) for p in selected["selected"]]
    assert len(picked) == K and picked == summary["draw_masks_next"]
    assert ids["lesion_13.png"] not in picked  # it has a mask already
    assert all(ids[n] not in picked for n in ids if n.startswith("healthy_"))  # a negative class has no mask
    assert _listed(ls, pid, _views(ls, pid)[DRAW_MASKS][0]) == set(picked)


def test_a_planted_wrong_label_shows_up_in_check_these_labels(project: dict[str, Any]) -> None:
    ls, pid, ids = project["ls"], project["project"], project["ids"]
    check = _cli(project["env"], "label-check", "--project", str(pid))
    assert str(ids[PLANTED]) == check["suspects"][0]["key"], check
    listed = _listed(ls, pid, _views(ls, pid)[CHECK_LABELS][0])
    assert ids[PLANTED] in listed and len(listed) <= 3, listed
    scores = {int(p["task"]): p.get("mislabeling") for p in ls.predictions(pid)}
    assert scores[ids[PLANTED]] == max(scores.values()) and scores[ids[PLANTED]] > 0.5, scores


def test_with_task_fields_the_tabs_filter_on_reserved_fields_only(project: dict[str, Any]) -> None:
    ls, pid, ids = project["ls"], project["project"], project["ids"]
    env = {**project["env"], "AXX_TASK_FIELDS": "true"}
    summary = _cli(env, "views", "--project", str(pid))
    assert summary["tasks_written"] > 0
    by_id = {int(t["id"]): t["data"] for t in ls.tasks(pid)}
    for data in by_id.values():
        assert set(data) - set(TASK_FIELDS) == {"image", "note"}  # the user's fields untouched
        assert data["image"].startswith(project["static_url"])
    ranked = {t: d["axx_mask_rank"] for t, d in by_id.items() if "axx_mask_rank" in d}
    assert sorted(ranked, key=ranked.get) == summary["draw_masks_next"]
    views = _views(ls, pid)
    assert all(len(views[t]) == 1 for t in TITLES)
    assert _listed(ls, pid, views[DRAW_MASKS][0]) == set(summary["draw_masks_next"])
    assert ids[PLANTED] in _listed(ls, pid, views[CHECK_LABELS][0])
    assert _cli(env, "views", "--project", str(pid))["tasks_written"] == 0  # nothing changed: nothing written
