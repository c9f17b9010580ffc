import os
import subprocess
import sys

import pytest

from axx_backend.core.synthetic import make_dataset


def run_cli(*args, env=None, check=True):
    """Run `axx-backend ARGS` the way a user does, in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "axx_backend", *map(str, args)], capture_output=True, text=True, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"axx-backend {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"), n_per_class=14, size=128, seed=0)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, dataset_dir):
    """A small offline-preset version trained once for the whole test session."""
    model_dir = tmp_path_factory.mktemp("models")
    run_cli("train", dataset_dir, "--model-dir", model_dir, "--preset", "offline", "--input-size", "224")
    return model_dir
