"""The --device flag of train.py, test.py and the tools (ground.py, extract_features.py, the page),
and which --amp runs on that device."""
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


def check_amp(amp: str, device: torch.device, compile_model: bool = False) -> str | None:
    """A one-line DeviceError for an --amp this device cannot run; otherwise a note to log, or None.

    On the CPU only bf16 autocasts: fp16 training needs a loss scaler and fp16 kernels that CPUs
    lack. bf16 GEMMs are fast where the CPU has AMX or AVX512-BF16 (docs/performance.md) and
    emulated, slower than float32, where it has neither. With --compile, bf16 on the CPU is refused:
    inductor's CPU code for nn.MultiheadAttention with attention dropout under bf16 autocast returns
    NaN gradients (torch 2.14; eager, aot_eager and float32 inductor are finite), so the first
    update turns the weights into NaN."""
    if amp == "none" or device.type != "cpu":
        return None
    if amp != "bf16":
        raise DeviceError(f"--amp {amp} needs CUDA; on the CPU use --amp bf16 or none")
    if compile_model:
        raise DeviceError("--compile with --amp bf16 on the CPU trains on NaN gradients (torch's inductor, "
                          "attention dropout); drop one of the two (on the CPU eager bf16 is also the faster)")
    if not cpu_has_bf16():
        return ("--amp bf16: this CPU has neither AMX nor AVX512-BF16, so bf16 matrix products are emulated "
                "and slower than float32 (--amp none)")
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16); True if unknown."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [p for p in probes if p is not None]
    if not probes:
        return True
    try:
        return any(p() for p in probes)
    except RuntimeError:
        return True
