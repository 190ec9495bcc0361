"""Where a loaded model's weights are, when accelerate spreads it over devices (--device-map auto).

accelerate (through transformers' device_map) leaves each module on its device and moves
activations between them in its forward hooks. A module it *offloads* (to the CPU while the
forward runs on a GPU) keeps a meta tensor as its `weight`: the values live in the hook's
weights map and are copied to the execution device for each forward. Scoring reads |W| and
interventions change entries in place, so both go through `resident_weight`, the tensor
that really holds the values (changes to it are what the next forward sees).

Disk offload is refused (`check_placement`): accelerate rereads those weights from files on
each forward, so an intervention's change would not be seen.
"""

from __future__ import annotations

import torch
from torch import nn

from mlarch.errors import MlarchError
from mlarch.wording import Arg, error


def _hooks(module: nn.Module) -> list:
    """accelerate's hooks on `module` (a SequentialHook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def resident_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight`, or where an offloading hook keeps its values while it is on `meta`."""
    weight = module.weight
    if weight.device.type != "meta":
        return weight
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if getattr(hook, "offload", False) and weights is not None:
            held = weights["weight"]
            if held.device.type != "meta":
                return held
    raise error(MlarchError, "a scored module's weight is on the meta device and no offloading hook holds its "
                "values: load the model without ", Arg("device_map"), ", or with more memory for the devices")


def input_device(model: nn.Module) -> torch.device:
    """Where a dispatched model's inputs go: its input embedding's device (its execution
    device when offloaded; accelerate's hooks move inputs there anyway)."""
    embed = model.get_input_embeddings()
    weight = getattr(embed, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for hook in _hooks(embed):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return torch.device("cpu")


def device_map_of(model: nn.Module) -> dict[str, str]:
    """Where a model loaded with a device map sits (module prefix -> device, as text): the map
    accelerate dispatched by, or {"": device} when it all fits on one (transformers then sets
    no hf_device_map)."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        return {str(name): (f"cuda:{device}" if isinstance(device, int) else str(device))
                for name, device in placed.items()}
    devices = sorted({str(p.device) for p in model.parameters()})
    return {"": ",".join(devices) or "cpu"}


def check_placement(ref: str, placed: dict[str, str] | None) -> None:
    """Refuse disk offload (see the module docstring), naming the modules."""
    on_disk = sorted(name for name, device in (placed or {}).items() if device == "disk")
    if on_disk:
        raise error(MlarchError, Arg("device_map", "auto"), f" offloaded {len(on_disk)} module(s) of {ref} to disk "
                    f"({', '.join(on_disk[:3])}{', ...' if len(on_disk) > 3 else ''}): mlarch needs every weight in "
                    "GPU or CPU memory; use a machine with more memory, or ", Arg("dtype", "bfloat16"))


def describe(placed: dict[str, str] | None) -> dict | None:
    """The provenance record of a device map: the map itself, how many modules each device
    holds, and each GPU's name (a split over GPUs of different kinds runs different kernels)."""
    if placed is None:
        return None
    counts: dict[str, int] = {}
    for device in placed.values():
        counts[device] = counts.get(device, 0) + 1
    record = {"device_map": placed, "modules_per_device": dict(sorted(counts.items()))}
    gpus = sorted(device for device in counts if device.startswith("cuda"))
    if gpus:
        record["device_names"] = {device: torch.cuda.get_device_name(torch.device(device)) for device in gpus}
    return record
