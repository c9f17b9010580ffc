"""The API client: key kinds, and keeping project.model_version in step (against the fake Label Studio)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from axx_backend.labelstudio.client import LabelStudioClient, LabelStudioError, ModelVersionSync
from tests.test_labelstudio_images import LEGACY, PAT, FakeLabelStudio


@pytest.fixture()
def ls() -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio()
    yield server
    server.close()


def test_client_uses_either_key(ls: FakeLabelStudio) -> None:
    assert LabelStudioClient(ls.url, LEGACY).get_project(1)["model_version"] == "AXX"
    pat = LabelStudioClient(ls.url, PAT)
    assert pat.get_project(1)["id"] == 1 and ls.refreshes == 1
    ls.valid_access.clear()  # the access token expired early: refreshed once on 401, then the call succeeds
    assert pat.get_project(1)["id"] == 1 and ls.refreshes == 2
    with pytest.raises(LabelStudioError) as e:
        LabelStudioClient(ls.url, "wrong").get_project(1)
    assert e.value.status == 401


def test_model_version_sync_retries_while_label_studio_refuses(ls: FakeLabelStudio) -> None:
    client = LabelStudioClient(ls.url, PAT)
    sync = ModelVersionSync(client, delays=(0, 0, 0, 0), sleep=lambda _s: None)
    ls.patch_answers = [400, 400]  # no stored prediction of the version yet, twice
    assert sync.sync_now("1", "v2").startswith("set")
    assert ls.project_version == "v2"
    assert sync.sync_now("1", "v2") == "in sync"
    ls.patch_answers = [400] * 10
    assert sync.sync_now("1", "v3").startswith("failed") and ls.project_version == "v2"
    ls.patch_answers = [403]
    outcome = sync.sync_now("1", "v4", delays=(0, 0, 0))
    assert "403" in outcome and ls.patch_answers == []  # not retried: only 400 is worth waiting for


def test_model_version_sync_runs_in_the_background_once(ls: FakeLabelStudio) -> None:
    client = LabelStudioClient(ls.url, LEGACY)
    sync = ModelVersionSync(client, delays=(0.2, 0.2))
    assert sync.schedule("1", "v9") is True
    assert sync.schedule("1", "v9") is False  # already pending
    deadline = time.monotonic() + 10
    while sync.results.get(("1", "v9")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ls.project_version == "v9"
    assert sync.schedule("1", "v9") is False  # recently done
    assert ModelVersionSync(None).schedule("1", "v9") is False  # no API key: nothing to do


def test_a_predict_while_a_setup_sync_runs_extends_its_retries(ls: FakeLabelStudio) -> None:
    gate = threading.Event()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        gate.wait(5)

    sync = ModelVersionSync(LabelStudioClient(ls.url, LEGACY), delays=(0.01, 0.02, 0.03), sleep=sleep)
    ls.patch_answers = [400] * 3  # refused until the predictions are stored
    assert sync.schedule("1", "v5", attempts=1) is True  # from /setup: one try
    assert sync.schedule("1", "v5", attempts=1) is False
    assert sync.schedule("1", "v5") is False  # from /predict while it runs: extend, do not start a second
    gate.set()
    deadline = time.monotonic() + 10
    while ("1", "v5") not in sync.results:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert sync.results[("1", "v5")].startswith("set") and ls.project_version == "v5"
    assert len(slept) == 4  # one from /setup + the full backoff after /predict, stopping at the success
    assert sync.schedule("1", "v5", attempts=1) is False  # done recently
