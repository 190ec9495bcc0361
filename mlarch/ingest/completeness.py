"""Whether a loaded checkpoint holds exactly the weights its config describes.

Neutral: loading.py and named_models.py (which converts a GGUF file once) both check the
loading report with it, and it imports neither.
"""

from __future__ import annotations

from mlarch.errors import MlarchError


def check_complete(ref: str, kind: str, report: dict) -> None:
    """Refuse a model whose checkpoint does not hold exactly the weights its config describes:
    transformers would initialise the missing ones randomly and they would be scored as real.
    Heads tied to the embedding are not reported by transformers, so they pass."""
    missing = sorted(report.get("missing_keys") or ())
    unexpected = sorted(report.get("unexpected_keys") or ())
    mismatched = sorted(report.get("mismatched_keys") or ())
    errors = list(report.get("error_msgs") or ())
    if not (missing or unexpected or mismatched or errors):
        return
    what = {"folder": "model folder", "gguf": "GGUF file", "hub": "hub model", "named": "named model"}[kind]
    parts = [f"{len(missing)} weight{'s' if len(missing) != 1 else ''} missing{_names(missing)}",
             f"{len(unexpected)} unexpected{_names(unexpected)}"]
    if mismatched:
        shapes = [f"{key} {_shape(ckpt)} in the checkpoint, {_shape(model)} in the config"
                  for key, ckpt, model in mismatched]
        parts.append(f"{len(mismatched)} of another shape{_names(shapes)}")
    if errors:
        parts.append(f"{len(errors)} load error{'s' if len(errors) != 1 else ''}{_names(errors)}")
    raise MlarchError(
        f"{what} {ref} does not match its config: {', '.join(parts)}: "
        "restore the checkpoint's weight files or pass the complete model"
    )


def _names(items: list[str], shown: int = 3) -> str:
    """' (a, b, c, ...)' with names from the checkpoint made printable and short: they are untrusted."""
    if not items:
        return ""
    clean = [(s if s.isprintable() else ascii(s))[:120] for s in map(str, items[:shown])]
    return f" ({', '.join(clean)}{', ...' if len(items) > shown else ''})"


def _shape(shape) -> str:
    return "x".join(str(int(n)) for n in shape) or "scalar"
