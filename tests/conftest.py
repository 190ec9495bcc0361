import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import build_model, write_data  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {kind: build_model(kind, folder) for kind in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    math, control = write_data(tmp_path_factory.mktemp("data"))
    return {"math": math, "control": control}
