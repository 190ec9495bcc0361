"""Named data sources: public corpora fetched from pinned upstream commits and verified by
sha256 (pooch caches them), or read from a local folder laid out like `../shared/data`
(`--data-dir`), plus the `starter` smoke-test set shipped in the package.

Each source knows its languages, files, digests, licence and text template; all of it
goes into every run's provenance.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mlarch.errors import MlarchError
from mlarch.wording import Arg, error
from mlarch.ingest.datafiles import QA_TEMPLATE, TEXT_TEMPLATE, LoadedItems, parse_records, sha256_file

_RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"


@dataclass(frozen=True)
class Upstream:
    """A pinned upstream repository folder: repository, commit and folder."""
    repo: str
    commit: str
    folder: str  # folder inside the upstream repository

    def url(self, name: str) -> str:
        """The raw download URL of file `name` in the upstream folder at the pinned commit."""
        return _RAW.format(repo=self.repo, commit=self.commit, path=f"{self.folder}/{name}")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a named source: where it lies inside a --data-dir folder, where it comes from upstream, and its
    sha256."""
    local: str  # path inside a --data-dir folder, e.g. "mgsm/mgsm_en.tsv"
    upstream: Upstream
    name: str  # file name upstream
    sha256: str


def _verify(path: Path, expected: str, label: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise error(
            MlarchError, f"{label} ({path}) has sha256 {actual}, expected {expected}: the file is damaged or a "
            "different version; delete it (or fix ", Arg("data_dir"), ") and try again"
        )


def fetch(file: RemoteFile, data_dir: Path | None) -> Path:
    """A verified local copy of `file`: from data_dir if given, else the pooch cache."""
    if data_dir is not None:
        path = Path(data_dir).expanduser() / file.local
        if not path.is_file():
            raise error(
                MlarchError, f"{path} is missing from ", Arg("data_dir", str(data_dir)), ": lay the folder out like "
                f"../shared/data (it needs {file.local})"
            )
        _verify(path, file.sha256, file.local)
        return path
    import pooch

    from mlarch import cache

    # its "Downloading data from ..." line is not ours to print: under --quiet, and before an
    # error, it made two lines (the library prints nothing; transformers' logging is silenced alike)
    pooch.get_logger().setLevel("WARNING")
    folder = cache.data_dir()  # an unusable $MLARCH_CACHE is its own error, not the network's
    try:
        return Path(pooch.retrieve(
            url=file.upstream.url(file.name), known_hash=f"sha256:{file.sha256}",
            fname=file.local.replace("/", "__"), path=folder, progressbar=False,
        ))
    except ValueError as exc:  # pooch's hash mismatch
        raise MlarchError(f"{file.local}: {' '.join(str(exc).split())}") from None
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise error(
            MlarchError, f"could not download {file.local} from {file.upstream.url(file.name)} ({reason}): "
            "check the network, or pass ", Arg("data_dir", shown="DIR"),
            " with a local copy laid out like ../shared/data"
        ) from None


@dataclass
class NamedSource:
    """A public corpus registered by name (mgsm, gsm8k, flores, starter): its languages and expected item counts,
    files with digests, licence and text template. load() gives a language's items."""
    name: str
    kind: str  # what the text is: 'math' | 'control' | 'math+control'
    licence: str
    upstream: str
    template: str
    counts: dict[str, int]  # expected item count per language
    data_dir: Path | None = None
    notes: str = ""
    files: dict[str, list[RemoteFile]] = field(default_factory=dict)
    train_from: dict[str, int] = field(default_factory=dict)  # lang -> first item of the training split

    def languages(self) -> list[str]:
        """The source's language codes."""
        return list(self.counts)

    def check_lang(self, lang: str) -> None:
        """Raise an MlarchError naming the source's languages unless it has `lang`."""
        if lang not in self.counts:
            raise MlarchError(
                f"data source {self.name!r} has no language {lang!r}; it has: {', '.join(self.languages())}"
            )

    def load(self, lang: str, role: str = "math") -> LoadedItems:
        """A language's items (LoadedItems): its files fetched (or read from data_dir) and sha256-checked, parsed in
        file order, their count checked."""
        self.check_lang(lang)
        paths = [fetch(f, self.data_dir) for f in self.files[lang]]
        pairs = self.parse_pairs(lang, paths)
        texts = self.parse(lang, paths) if pairs is None else [self.text(q, a) for q, a in pairs]
        if len(texts) != self.counts[lang]:
            raise MlarchError(
                f"data source {self.name!r} gave {len(texts)} items for {lang!r}, expected {self.counts[lang]}"
            )
        return LoadedItems(texts, [self.template], {f.local: f.sha256 for f in self.files[lang]}, pairs,
                           self.train_from.get(lang))

    def parse(self, lang: str, paths: list[Path]) -> list[str]:  # pragma: no cover - overridden
        """The texts of a language from its files (sources of plain texts override this)."""
        raise NotImplementedError

    def parse_pairs(self, lang: str, paths: list[Path]) -> list[tuple[str, str]] | None:
        """(question, answer) per item for question-answer sources, None for plain texts."""
        return None

    def text(self, question: str, answer: str) -> str:
        """The text of a question-answer item (QA_TEMPLATE)."""
        return QA_TEMPLATE.format(question=question, answer=answer)

    def describe(self) -> dict:
        """The source as recorded in provenance: kind 'named', name, licence, upstream, template and notes."""
        return {"kind": "named", "name": self.name, "licence": self.licence, "upstream": self.upstream,
                "template": self.template, "notes": self.notes}


# --- MGSM ---------------------------------------------------------------------------
MGSM_UPSTREAM = Upstream("google-research/url-nlp", "452a21ad3dae5668c06ceeac21ff073e1e40f9be", "mgsm")
MGSM_SHA = {
    "bn": "6b00bc7cc635547e866989284afa924d789b5affa2eb8de623c385dd943ad977",
    "de": "4dfea30fede44b813e2e496f5f0534049e83c7cc8aed6e00600b30ec62053626",
    "en": "50021d0f28cc957edcb44e7806425b1c7fbd648ddcb9e0a8ec689d10e57d40fa",
    "es": "5bd27ebdf00140cec845c5298dc17715f5cd57d8edda6df1976db40bf3f0750a",
    "fr": "36207c1c03fd7cd3ea491441eb755408199f94e4a647851df531bbaedc99d606",
    "ja": "59a2b50debe77981fd784cb3b2bef1505e3abf2a37116dc9d7a366ab029b4637",
    "ru": "6bd30fd2e80c5bac23f566fb4ae0e6a55a19578401fbf9a01fb21beb3645fef8",
    "sw": "2bac828d77229e65d7c7197b1ad4a2cb5b1fe99b163f2cbdd66501de6a2115c4",
    "te": "dd6b1452c244bb2e4ba254c01ea84137f80c1cefc57d69c23b0ed88b9c0f36b7",
    "th": "f3932dc5ad8e9d0ea82b017adc1e1461dd647af861e7166d6741986602a0cfd6",
    "zh": "b2fa63151022370a0de1f4211c8c284eae74b0f5a3b003b1d5982c0d4a73f661",
}


class Mgsm(NamedSource):
    """MGSM: 250 grade-school problems per language, question and the number answer (no worked solutions)."""
    def parse_pairs(self, lang, paths):
        """(question, answer) per line of the language's question TAB answer file."""
        pairs = []
        for lineno, line in enumerate(paths[0].read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            question, sep, answer = line.rpartition("\t")
            if not sep:
                raise MlarchError(f"{paths[0]}, line {lineno}: expected question TAB answer")
            pairs.append((question.strip(), answer.strip()))
        return pairs


def mgsm(data_dir):
    """The named source `mgsm` (files read from data_dir if given, else downloaded into the cache)."""
    return Mgsm(
        name="mgsm", kind="math", licence="CC-BY-4.0",
        upstream=f"github.com/{MGSM_UPSTREAM.repo}@{MGSM_UPSTREAM.commit[:12]} ({MGSM_UPSTREAM.folder}/)",
        template=QA_TEMPLATE + "   (answer: the number only; MGSM has no worked solutions)",
        counts={lang: 250 for lang in MGSM_SHA}, data_dir=data_dir,
        notes="Shi et al. 2022, 'Language Models are Multilingual Chain-of-Thought Reasoners'",
        files={lang: [RemoteFile(f"mgsm/mgsm_{lang}.tsv", MGSM_UPSTREAM, f"mgsm_{lang}.tsv", sha)]
               for lang, sha in MGSM_SHA.items()},
    )


# --- GSM8K and the paper's translations ------------------------------------------------
GSM8K_UPSTREAM = Upstream("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                          "grade_school_math/data")
PAPER_UPSTREAM = Upstream("luisavictor/math-across-languages", "e3960d649c7d81bbcfc5151f0257e28919041e42",
                          "custom_datasets")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_answer(answer: str) -> str:
    """A worked solution with GSM8K's calculator annotations (<<a*b=c>>) removed."""
    return re.sub(r"[ \t]+", " ", _CALCULATOR.sub("", answer)).strip()


def gsm8k_text(question: str, answer: str) -> str:
    """Q/A template with GSM8K's calculator annotations removed."""
    return QA_TEMPLATE.format(question=question.strip(), answer=gsm8k_answer(answer))


class Gsm8k(NamedSource):
    """GSM8K with worked solutions: English test then train items, and the paper's German and Hindi translations of
    the test set."""
    def parse_pairs(self, lang, paths):
        """(question, worked solution) per item of the language's files, calculator notes removed."""
        texts = []
        for path in paths:
            content = path.read_text(encoding="utf-8")
            if path.suffix == ".jsonl":
                for lineno, line in enumerate(content.splitlines(), start=1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise MlarchError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
                        texts.append((record["question"].strip(), gsm8k_answer(record["answer"])))
            else:
                for record in csv.DictReader(io.StringIO(content)):
                    texts.append((record["question"].strip(), gsm8k_answer(record["answer"])))
        return texts


    def reference_answers(self, lang):
        """de/hi: the English test answers of the same items (their translations garble numbers:
        "2 ,125", or no number at all), with the file they come from; en: None (its own)."""
        if lang == "en":
            return None
        english = self.files["en"][0]  # the test set, parallel to de and hi item by item
        path = fetch(english, self.data_dir)
        answers = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                answers.append(json.loads(line)["answer"])
        return answers, {english.local: english.sha256}


def gsm8k(data_dir):
    """The named source `gsm8k` (files read from data_dir if given, else downloaded into the cache)."""
    return Gsm8k(
        name="gsm8k", kind="math", licence="MIT (GSM8K); de/hi translations: no licence stated, attribute the paper",
        upstream=(f"github.com/{GSM8K_UPSTREAM.repo}@{GSM8K_UPSTREAM.commit[:12]}; "
                  f"de/hi: github.com/{PAPER_UPSTREAM.repo}@{PAPER_UPSTREAM.commit[:12]}"),
        template=QA_TEMPLATE + "   (worked solution, calculator notes <<...>> removed, ends '#### N')",
        counts={"en": 1319 + 7473, "de": 1319, "hi": 1319}, data_dir=data_dir, train_from={"en": 1319},
        notes="en items: test (0-1318, parallel to de and hi) then train; de/hi: NLLB-200 3.3B translations "
              "of the test set by the authors of arXiv 2606.18453",
        files={
            "en": [RemoteFile("gsm8k/test.jsonl", GSM8K_UPSTREAM, "test.jsonl",
                              "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
                   RemoteFile("gsm8k/train.jsonl", GSM8K_UPSTREAM, "train.jsonl",
                              "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465")],
            "de": [RemoteFile("gsm8k_de/gsm8k_de_test.csv", PAPER_UPSTREAM, "GSM8k_German/gsm8k_de_test.csv",
                              "28b351a2e91177dd867424a048ca5d90e6b9b1d65e15fc09ad82241ca942d55f")],
            "hi": [RemoteFile("gsm8k_hi/gsm8k_hi_test.csv", PAPER_UPSTREAM, "GSM8k_Hindi/gsm8k_hi_test.csv",
                              "65e9aa4c687fc2edfd351ba1d13f3d7a2201175b796750429add93574bfb8545")],
        },
    )


# --- FLORES-200 -------------------------------------------------------------------------
FLORES_UPSTREAM = Upstream("Helsinki-NLP/OPUS-MT-testsets", "ac0f19c0be3cb4e0d9450fcb2d7a9847c4bdd180",
                           "datasets/facebook/flores/flores200_dataset")
FLORES_CODES = {
    "en": ("eng_Latn", "612e9fbe87997617c0fa8fa8929654a4f49b728d96738112c2b86ef6a1d78d88"),
    "de": ("deu_Latn", "9a1bfa90d153fedb7ff80047f4a63d493998888eddb056e8a28e24592f26e5f2"),
    "fr": ("fra_Latn", "82f5b000db419ef9254eea7857cce82943b361090942f17ed696e3dce2944f42"),
    "hi": ("hin_Deva", "5f5fd39acadca29fb044a0398e81869e48f37de979df086f2fad4a7d1fd2d015"),
    "bn": ("ben_Beng", "6699aa77b4c93d520971868cd5ff06a1e3b5ddfde852da13337f5194bc23086f"),
    "es": ("spa_Latn", "40fcb836b49b0a461a14c00b8bce1f03113f8d2668132af424e74b2421d18ce9"),
    "ja": ("jpn_Jpan", "36b8e392ae9404a20e8448c731d16d957ac1b94588d97fb691128ae706b63606"),
    "ru": ("rus_Cyrl", "cdc706ed862d1d35d8d67cfda0b396766646885434958b18291aa760ff1bb59e"),
    "sw": ("swh_Latn", "834ce9e5f48893505f9d69dec24da2545be4323e841fb23440e36c62c5d61ee4"),
    "te": ("tel_Telu", "2dc641b4fb69347efe4b0c0f2063372c643f20c664b41a1f4421b69ba2a06420"),
    "th": ("tha_Thai", "d9bed1bf963821eab20051b18674950f345b67b0d0925290eaa6836eb06e76ca"),
    "zh": ("zho_Hans", "b30158b1b76f7cee08530d8127a9769f4512597c7eefe97ae1ccf630d5b6e7fd"),
}
FLORES_METADATA = RemoteFile("flores200/metadata_devtest.tsv", FLORES_UPSTREAM, "metadata_devtest.tsv",
                             "8edac47f861fcf6b54dad2068c10ba8f741da8b8676861c6bc27fcd9f5483b36")
_NO_SPACE = {"zh", "ja", "th"}  # scripts written without spaces between sentences


class Flores(NamedSource):
    """FLORES-200 devtest as control text: consecutive sentences of one article joined into a passage."""
    def parse(self, lang, paths):
        """The language's passages: devtest sentences grouped by their article URL (from the metadata file), in order."""
        sentences = paths[0].read_text(encoding="utf-8").splitlines()
        urls = [row["URL"] for row in csv.DictReader(io.StringIO(paths[1].read_text(encoding="utf-8")),
                                                        delimiter="\t", quoting=csv.QUOTE_NONE)]
        if len(urls) != len(sentences):
            raise MlarchError(f"{paths[0]} has {len(sentences)} sentences but the metadata lists {len(urls)}")
        joiner = "" if lang in _NO_SPACE else " "
        passages, current, previous = [], [], None
        for url, sentence in zip(urls, sentences):
            if url != previous and current:
                passages.append(joiner.join(current))
                current = []
            current.append(sentence.strip())
            previous = url
        if current:
            passages.append(joiner.join(current))
        return passages


def flores(data_dir):
    """The named source `flores` (files read from data_dir if given, else downloaded into the cache)."""
    return Flores(
        name="flores", kind="control", licence="CC-BY-SA-4.0",
        upstream=f"github.com/{FLORES_UPSTREAM.repo}@{FLORES_UPSTREAM.commit[:12]} ({FLORES_UPSTREAM.folder}/devtest)",
        template=TEXT_TEMPLATE + "   (a passage: consecutive devtest sentences of one article URL)",
        counts={lang: 281 for lang in FLORES_CODES}, data_dir=data_dir,
        notes="NLLB Team 2022, 'No Language Left Behind'; general text from Wikinews, Wikivoyage, Wikibooks",
        files={lang: [RemoteFile(f"flores200/{code}.devtest", FLORES_UPSTREAM, f"devtest/{code}.devtest", sha),
                      FLORES_METADATA] for lang, (code, sha) in FLORES_CODES.items()},
    )


# --- the starter set (shipped in the package) -----------------------------------------
STARTER_LANGS = ("en", "de", "fr", "hi", "bn", "zh")


class Starter(NamedSource):
    """The starter set shipped in the package: 24 math problems and 24 passages per language."""
    def load(self, lang: str, role: str = "math") -> LoadedItems:
        """A language's starter items of `role` (math problems or control passages), read from the package."""
        self.check_lang(lang)
        folder = "math" if role == "math" else "control"
        resource = resources.files("mlarch.starter") / folder / f"{lang}.jsonl"
        with resources.as_file(resource) as path:
            texts, templates, pairs = parse_records(path)
            digest = sha256_file(path)
        return LoadedItems(texts, templates, {f"mlarch/starter/{folder}/{lang}.jsonl": digest}, pairs)


def starter(data_dir):
    """The named source `starter` (data_dir is not used: the files ship with mlarch)."""
    return Starter(
        name="starter", kind="math+control", licence="Apache-2.0 (written for mlarch)",
        upstream="shipped in the mlarch package (mlarch/starter/)",
        template=f"math: {QA_TEMPLATE} (worked solution); control: {TEXT_TEMPLATE}",
        counts={lang: 24 for lang in STARTER_LANGS},
        notes="a smoke-test set for demos and quick trials, not a benchmark: 24 grade-school problems with "
              "worked solutions (--math starter) and 24 general passages (--control starter) per language",
    )


# name -> factory(data_dir) -> source; sources.resolve looks names up here
NAMED_SOURCES = {"mgsm": mgsm, "gsm8k": gsm8k, "flores": flores, "starter": starter}


def catalogue() -> list[dict]:
    """One row per named source, for `mlarch sources`."""
    rows = []
    for name, factory in NAMED_SOURCES.items():
        source = factory(None)
        counts = source.counts
        same = len(set(counts.values())) == 1
        rows.append({
            "name": name, "kind": source.kind, "languages": " ".join(counts),
            "items": f"{next(iter(counts.values()))} each" if same else ", ".join(f"{k} {v}" for k, v in counts.items()),
            "licence": source.licence, "upstream": source.upstream,
        })
    return rows
