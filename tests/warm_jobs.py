"""Job functions for tests/test_warm_worker.py, run by a real `axx-backend worker` (it imports them by name).

`probe` reports what its work horse inherited from the worker: the fake cache its preload hook `load` fills
(in the worker process, before the fork), and the loads so far. `probe_model` does the same with the real
version cache of pre-annotation chunks (`preannotate.chunk.preload_version`) and runs one inference, which
hangs if the worker started OpenMP before forking.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from axx_backend.jobs.warm import preload_with
from axx_backend.preannotate.chunk import preload_version
from axx_backend.preannotate.plan import registry_for

CACHE: dict[str, dict[str, Any]] = {}  # version dir -> what loading it gave, in the process that loaded it
LOADS: list[str] = []  # version dirs in the order they were loaded


def load(version_dir: str, action: str = "ok") -> None:
    if action == "bad-preload":
        raise RuntimeError("the preload hook fails")
    if version_dir not in CACHE:
        CACHE[version_dir] = {"loaded_in": os.getpid(), "weights": [1.0, 2.0, 3.0]}
        LOADS.append(version_dir)


@preload_with(load)
def probe(version_dir: str, action: str = "ok") -> dict[str, Any]:
    import torch

    seen = {"pid": os.getpid(), "cache": {k: dict(v) for k, v in CACHE.items()}, "loads": list(LOADS),
            "threads": torch.get_num_threads()}  # fmt: skip
    if action == "raise":
        CACHE[version_dir]["weights"].append(666.0)  # corrupts the horse's copy only
        CACHE.clear()
        raise RuntimeError("a chunk failed")
    if action == "kill":
        CACHE.clear()
        os.kill(os.getpid(), signal.SIGKILL)  # like a segfault or an OOM kill of the job
    return seen


@preload_with(preload_version)
def probe_model(spec_json: dict[str, Any], index: int = 0, task_ids: Any = (), attempt: int = 0) -> dict[str, Any]:
    """A stand-in for `rq_chunk_entry` with its preload: which versions the horse found loaded, and one
    inference with the version the spec pins."""
    import torch
    from PIL import Image

    registry = registry_for(spec_json["model_dir"])
    found = sorted(Path(v["path"]).name for v in registry.loaded().values())
    model = registry.get(Path(spec_json["version_path"]))
    annotation = model.annotator.annotate([Image.new("RGB", (96, 96), (120, 60, 60))])[0]
    return {"pid": os.getpid(), "found_loaded": found, "version": model.annotator.version,
            "label": annotation.label, "threads": torch.get_num_threads()}  # fmt: skip
