"""Device names as Hugging Face writes them: auto, cpu, cuda, cuda:N, mps.

`check` is torch-free (the CLI refuses a misspelt --device before anything loads);
`resolve` also asks torch whether the device is there.
"""

from __future__ import annotations

import re

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error

HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps."
_SPEC = re.compile(r"(auto|cpu|mps|cuda(:\d{1,4})?)")  # fullmatch: `$` would also match before a final newline


def check(spec: str) -> str:
    """`spec`, stripped of spaces and lower-cased, if it names a device; else a usage error.
    A control character (a newline, ESC) is refused, not stripped: no device name holds one."""
    value = spec.strip().lower() if isinstance(spec, str) and spec.isprintable() else ""
    if not _SPEC.fullmatch(value):
        shown = spec[:40] if isinstance(spec, str) else ascii(spec)[:40]  # repr escapes \n, \x1b...
        raise UsageError(f"unknown device {shown!r}: use auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps")
    return value


def resolve(spec: str):
    """The torch.device for `spec`, refusing one this machine does not have."""
    import torch

    value = check(spec)
    if value == "auto":  # mps only when asked: its kernels round differently from CPU's
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise error(MlarchError, Arg("device", value), " was asked for but no CUDA device is available: use ",
                        *_CPU_OR_AUTO)
        count = torch.cuda.device_count()
        if ":" in value and int(value.split(":")[1]) >= count:
            raise error(MlarchError, Arg("device", value), f" does not exist: this machine has {count} CUDA "
                        f"device(s), cuda:0 to cuda:{count - 1}")
    if value == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise error(MlarchError, Arg("device", "mps"), " was asked for but Apple's MPS backend is not available "
                        "here: use ", *_CPU_OR_AUTO)
    return torch.device(value)


_CPU_OR_AUTO = (Arg("device", "cpu"), Phrase(" or 'auto'", " or auto"))


def option_callback(ctx, param, value):
    """click callback for --device: a misspelt device is refused before anything loads."""
    return check(value)


DEVICE_MAP_HELP = ("auto: spread a model larger than one GPU over every GPU (then CPU memory) with accelerate; "
                   "leave --device at auto.")


def check_device_map(device_map, device: str = "auto"):
    """`device_map` ('auto', or None for one device) if usable with `device`; else a usage error.

    Checked before anything loads: accelerate must be installed, and the map decides every
    module's device, so an explicit --device contradicts it."""
    if device_map is None:
        return None
    value = device_map.strip().lower() if isinstance(device_map, str) else device_map
    if value != "auto":
        shown = device_map if isinstance(device_map, str) and device_map.isprintable() else ascii(device_map)
        raise error(UsageError, f"unknown device map {str(shown)[:40]!r}: use ", Arg("device_map", "auto"),
                    Phrase("", " (device_map='auto')"), ", or leave it out for one device")
    if check(device) != "auto":
        raise error(UsageError, Arg("device_map", "auto"), " places every module itself: drop ",
                    Arg("device", device), " (or drop ", Arg("device_map"), " to use that one device)")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise error(UsageError, Arg("device_map", "auto"), " needs accelerate, which is not installed: "
                    "pip install 'mlarch[device-map]' (or pip install 'accelerate>=1.1')")
    return value


def device_map_callback(ctx, param, value):
    """click callback for --device-map: only the value here; the --device clash is checked by
    the library (the API takes the same two options)."""
    if value is None:
        return None
    if value.strip().lower() != "auto":
        return check_device_map(value)  # raises the one-line usage error
    return "auto"
