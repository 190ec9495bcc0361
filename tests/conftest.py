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


@pytest.fixture(scope="module")
def pristine_llama(tmp_path_factory):
    """A tiny llama of the module's own, never changed: tests change llama_copy."""
    return build_model("llama", tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def llama_copy(pristine_llama, tmp_path):
    """A copy of pristine_llama that the test may edit (weights, config, index files)."""
    import shutil

    return Path(shutil.copytree(pristine_llama, tmp_path / "tiny-llama"))


VIEW_KS = [0.01, 0.05, 0.25]


@pytest.fixture(scope="session")
def llama_archive(tmp_path_factory, model_dir, data):
    """An archive with tiny-llama scored on en, de, bn (seed 1). Copy it before changing it."""
    import mlarch

    root = tmp_path_factory.mktemp("archive") / "arch"
    mlarch.open(root).ingest(str(model_dir["llama"]), ["en", "de", "bn"], data["math"], data["control"],
                             samples=6, top_k=VIEW_KS, device="cpu")
    return root


@pytest.fixture
def archive_copy(llama_archive, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(llama_archive, target)
    return target
