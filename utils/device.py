"""The --device flag of train.py, test.py and the tools (ground.py, extract_features.py, the page)."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device this machine does not have (reported in one line, like the other input errors)."""


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; a torch.device is returned as it is; any other name
    goes to torch.device, after a one-line DeviceError when it asks for CUDA and there is none."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was asked for but CUDA is not available on this machine "
                          "(use --device cpu or auto)")
    return torch.device(name)
