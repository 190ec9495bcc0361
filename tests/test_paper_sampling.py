"""Paper-compatible inputs: the authors' pandas draw (checked against pandas itself) and their
texts (the `qa` column verbatim, else the Instruct prompt), without pandas at run time."""

import csv
import json
import subprocess
import sys

import numpy as np
import pandas as pd  # test-only dependency (the `test` extra): the draw is checked against pandas itself
import pytest

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import paper_sampling, sources


def pandas_items(n_items, n_samples, seed, shuffle_seed):
    """The authors' two calls on a frame whose index is the file position."""
    frame = pd.DataFrame({"item": np.arange(n_items)})
    frame = frame.sample(frac=1, random_state=shuffle_seed)
    drawn = frame.sample(n=n_samples, replace=True, random_state=seed)
    assert drawn.index.tolist() == drawn["item"].tolist()
    return drawn["item"].tolist()


@pytest.mark.parametrize("n_items,n_samples,seed,shuffle_seed", [
    (7473, 500, 1, 1), (7473, 500, 101, 1), (7473, 500, 201, 1),  # the paper's: GSM8K train, seeds 1/101/201
    (281, 500, 1, 1), (24, 7, 3, 42), (1, 5, 0, 0), (10, 0, 5, 5), (1000, 100, 2**32 - 1, 123456789),
])
def test_pandas_draw_equals_pandas(n_items, n_samples, seed, shuffle_seed):
    got = paper_sampling.pandas_draw(n_items, n_samples, seed, shuffle_seed)
    assert got.dtype == np.int64 and got.tolist() == pandas_items(n_items, n_samples, seed, shuffle_seed)
    assert paper_sampling.draw("pandas", n_items, n_samples, seed, shuffle_seed).tolist() == got.tolist()


def test_pandas_draw_from_a_read_csv_frame(tmp_path):
    """As the authors load it: read_csv, shuffle, draw; items are the rows' file positions."""
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["qa", "answer"])
        for i in range(57):
            writer.writerow([f"Question {i}?\nAnswer: {i * 3}", i * 3])
    frame = pd.read_csv(path).sample(frac=1, random_state=1)
    drawn = frame.sample(n=40, replace=True, random_state=101)
    texts, _, _ = sources.parse_records(path, "paper")
    items = paper_sampling.pandas_draw(len(texts), 40, 101, 1)
    assert [texts[i] for i in items] == drawn["qa"].tolist()


def test_shuffle_matters_and_numpy_draw_unchanged():
    with_shuffle = paper_sampling.pandas_draw(100, 50, 1, 1)
    assert with_shuffle.tolist() != np.random.RandomState(1).choice(100, 50, replace=True).tolist()
    assert paper_sampling.draw("numpy", 100, 50, 7).tolist() == np.random.default_rng(7).integers(0, 100, 50).tolist()


def test_no_pandas_at_run_time():
    code = ("import sys, mlarch.ingest.paper_sampling as p, mlarch.ingest.sources, mlarch.ingest.mathneuro; "
            "p.pandas_draw(10, 3, 1, 1); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sampling_refusals():
    with pytest.raises(UsageError, match="0 to 4294967295"):
        paper_sampling.check_sampling("pandas", [1, 2**32], 1)
    with pytest.raises(UsageError, match="shuffle_seed="):
        paper_sampling.check_sampling("pandas", [1], -1)
    with pytest.raises(UsageError, match="shuffle_seed="):
        paper_sampling.check_sampling("pandas", [1], None)
    with pytest.raises(UsageError, match="numpy, pandas"):
        paper_sampling.check_sampling("torch", [1], None)
    paper_sampling.check_sampling("numpy", [2**40], None)  # mlarch's draw takes any BIGINT seed
    assert paper_sampling.describe("pandas", 1) == {
        "sampling": "pandas", "rule": paper_sampling.DESCRIPTIONS["pandas"], "shuffle_seed": 1}


QA_ROWS = ["  Q: Ana has 3 apples.\nA: 3 + 4 = 7 #### 7  ", "Frage, mit \"Zitat\", Komma\n\nAntwort: 5"]


def test_paper_template_qa_column_verbatim(tmp_path):
    path = tmp_path / "math.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "qa"])
        for i, qa in enumerate(QA_ROWS):
            writer.writerow([f"q{i}", f"a{i}", qa])
    texts, templates, _ = sources.parse_records(path, "paper")
    assert texts == QA_ROWS == pd.read_csv(path)["qa"].tolist()  # what the authors' pandas reads
    assert templates == [sources.QA_COLUMN_TEMPLATE]
    default, default_templates, _ = sources.parse_records(path)  # unchanged: Q/A of question, answer
    assert default == ["Q: q0\nA: a0", "Q: q1\nA: a1"] and default_templates == [sources.QA_TEMPLATE]


def test_paper_template_instruct_form(tmp_path):
    path = tmp_path / "pot.jsonl"
    rows = [{"question": "How many legs do 3 cats have?", "solution": "def solution():\n    return 3 * 4\n"},
            {"question": " Twice 5? ", "solution": "def solution():\n    return 10"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    texts, templates, _ = sources.parse_records(path, "paper")
    assert texts == [
        "Instruct: How many legs do 3 cats have? Let's write a Python program.\nOutput:\ndef solution():\n    return 3 * 4\n",
        "Instruct:  Twice 5?  Let's write a Python program.\nOutput:\ndef solution():\n    return 10",
    ]
    assert texts == [f"Instruct: {r['question']} Let's write a Python program.\nOutput:\n{r['solution']}" for r in rows]
    assert templates == [sources.INSTRUCT_TEMPLATE]


def test_paper_template_refusals(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(MlarchError, match="'qa' column or 'question' and 'solution'"):
        sources.parse_records(csv_path, "paper")
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps({"qa": "x"}) + "\n" + json.dumps({"question": "q", "solution": "s"}) + "\n")
    with pytest.raises(MlarchError, match="line 2"):  # a file with a qa column uses it for every record
        sources.parse_records(jsonl, "paper")
    with pytest.raises(UsageError, match="default, paper"):
        sources.parse_records(csv_path, "fancy")
    with pytest.raises(UsageError, match="path template"):
        sources.resolve("gsm8k", None, "paper")


def test_template_source_records_the_text_template(tmp_path):
    (tmp_path / "en.csv").write_text("qa\nhello there\n", encoding="utf-8")
    spec = str(tmp_path / "{lang}.csv")
    assert sources.resolve(spec).describe() == {"kind": "template", "template": spec}  # as before
    paper = sources.resolve(spec, None, "paper")
    assert paper.describe() == {"kind": "template", "template": spec, "text_template": "paper"}
    assert paper.load("en").texts == ["hello there"]
