"""Inputs that pass a check they should fail: a language code with a trailing newline ('$' in a
regex matches before a final newline, so `re.match('^...$')` accepts 'en\\n'). Through the Python
API such a code would be archived, and then no CLI command could name it."""

import pytest

import mlarch
from mlarch.errors import UsageError
from mlarch.ingest.config import check_langs


@pytest.mark.parametrize("lang", ["en\n", "\nen", "en\r\n", "e n", "en\x00", ""])
def test_language_codes_with_line_ends_or_controls_are_refused(lang):
    with pytest.raises(UsageError) as caught:
        check_langs([lang, "de"])
    assert str(caught.value) == f"language code {lang!r} is not valid: use codes such as en, de, zh"


def test_valid_language_codes_pass():
    check_langs(["en", "de", "zh-Hans", "pt_BR", "x" * 32])


def test_api_ingest_refuses_a_code_with_a_newline_before_any_work(tmp_path, model_dir):
    root = tmp_path / "arch"
    with pytest.raises(UsageError, match=r"language code 'en\\n' is not valid"):
        mlarch.open(root).ingest(str(model_dir["llama"]), ["en\n", "de"], "starter", "starter", samples=2,
                                 top_k=[0.01], device="cpu", progress=False)
    assert not root.exists() or mlarch.open(root).sql("SELECT count(*) FROM runs").item() == 0
