"""Device names as Hugging Face writes them: auto, cpu, cuda, cuda:N, mps.

`check` is torch-free (the CLI refuses a misspelt --device before anything loads);
`resolve` also asks torch whether the device is there.
"""

from __future__ import annotations

import re

from mlarch.errors import MlarchError, UsageError

HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps."
_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,4})?)$")


def check(spec: str) -> str:
    """`spec`, stripped and lower-cased, if it names a device; else a usage error."""
    value = spec.strip().lower() if isinstance(spec, str) else ""
    if not _SPEC.match(value):
        shown = spec if isinstance(spec, str) and spec.isprintable() else ascii(spec)
        raise UsageError(f"unknown device {shown[:40]!r}: use auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps")
    return value


def resolve(spec: str):
    """The torch.device for `spec`, refusing one this machine does not have."""
    import torch

    value = check(spec)
    if value == "auto":  # mps only when asked: its kernels round differently from CPU's
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MlarchError(f"--device {value} was asked for but no CUDA device is available: "
                              "use --device cpu or auto")
        count = torch.cuda.device_count()
        if ":" in value and int(value.split(":")[1]) >= count:
            raise MlarchError(f"--device {value} does not exist: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if value == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise MlarchError("--device mps was asked for but Apple's MPS backend is not available here: "
                              "use --device cpu or auto")
    return torch.device(value)


def option_callback(ctx, param, value):
    """click callback for --device: a misspelt device is refused before anything loads."""
    return check(value)
