"""Which device a computation runs on: one check, with errors that say what to do."""

from __future__ import annotations

import torch

from tailorkit.errors import TailorkitError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"`` (or None), ``"cuda"``, ``"cuda:N"``, ``"auto"`` (a GPU if one is usable,
    else the CPU) or a torch.device, checked; raises TailorkitError.

    Only looks at CUDA when a CUDA device is asked for, so the CPU path never
    initialises it.
    """
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise TailorkitError(
            f"device {device!r}: not a device name; tailorkit runs on 'cpu' (the default), "
            "'cuda', 'cuda:N' or 'auto'"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise TailorkitError(
            f"device {device!r}: tailorkit runs on 'cpu' (the default), 'cuda' or 'cuda:N', "
            f"not on {dev.type}"
        )
    if not torch.version.cuda:
        raise TailorkitError(
            f"device {device!r} was asked for, but this torch ({torch.__version__}) is built "
            "without CUDA: install a CUDA build of torch, or run on the CPU (device='cpu', "
            "the default)"
        )
    if not torch.cuda.is_available():
        raise TailorkitError(
            f"device {device!r} was asked for, but no CUDA GPU is usable "
            f"(torch {torch.__version__} has CUDA {torch.version.cuda}, yet "
            "torch.cuda.is_available() is False): check the NVIDIA driver and "
            "CUDA_VISIBLE_DEVICES, or run on the CPU (device='cpu')"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise TailorkitError(
            f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def computes_bfloat16(device: str | torch.device | None) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU that supports it, or a CPU
    with AMX or AVX512-BF16 (Linux's CPU flags), where bfloat16 layers run 2-3x faster than
    float32; elsewhere bfloat16 is emulated and slower."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
