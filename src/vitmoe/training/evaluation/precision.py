"""Mixed precision: the autocast region of an `amp` mode, the one the training step and the
evaluation share (fp16's loss scaling is the step's own: loop.step), and what "auto" picks.

bf16 pays only where the hardware computes in it. A CPU without AVX-512 BF16 or AMX runs bf16
matmuls through a conversion path: on a 2-core AVX2 EPYC a 256x256 bf16 matmul took 27 ms against
0.45 ms in fp32, and the Fashion-MNIST recipe trained 70 steps in 240 s where float32 trains about
1,080. So the recipe asks for "auto", and an explicit bf16 on such a CPU is warned about
(`amp_note`)."""
from __future__ import annotations

import contextlib
import functools
import platform

import torch


@functools.lru_cache(maxsize=None)
def _native_bf16(device_type: str, index: int | None) -> bool:
    if device_type == "cuda":  # is_bf16_supported() also says yes where bf16 is emulated (before Ampere)
        if not torch.cuda.is_available():
            return False
        return torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())[0] >= 8
    if device_type == "cpu":
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if avx512_bf16 is not None and platform.machine().lower() in ("x86_64", "amd64"):
            # AVX-512 alone is not enough: oneDNN then converts (Skylake to Ice Lake servers)
            return bool(avx512_bf16() or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        try:  # other CPUs (aarch64): oneDNN's own answer
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without it: float32 is the safe guess
            return False
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (CUDA: compute capability 8+; CPU:
    AVX-512 BF16 or AMX)."""
    device = torch.device(device)
    return _native_bf16(device.type, device.index)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mode `amp` means on `device`: "auto" is bf16 where it is native, else "off"."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "off"


def amp_note(amp: str, device: torch.device) -> str | None:
    """What the run log says about precision: the choice "auto" made, or a warning when bf16 was
    asked of a device that only emulates it; None when there is nothing to say."""
    device = torch.device(device)
    where = "this CPU" if device.type == "cpu" else f"device {device}"
    if amp == "auto":
        if native_bf16(device):
            return f"amp auto: bf16 autocast ({where} computes bf16 natively)"
        return f"amp auto: float32 ({where} has no native bf16, where bf16 autocast is many times slower)"
    if amp == "bf16" and not native_bf16(device):
        return (f"warning: amp bf16 on {where}, which has no native bf16 (CPUs need AVX-512 BF16 or AMX): its bf16 "
                f"matmuls are emulated and many times slower than float32; --amp auto or off trains faster")
    return None


def autocast_context(amp: str, device: torch.device):
    """The autocast region of an `amp` mode: "off" (fp32), "bf16", "fp16" or "auto" (`resolve_amp`)."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
