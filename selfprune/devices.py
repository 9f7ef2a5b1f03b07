"""--device / --dtype resolution, shared by every command."""

from __future__ import annotations

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def precision(device: str = "auto", dtype: str = "auto") -> dict[str, str]:
    """The resolved device kind and dtype of a run: they change every number, so every cache key
    holds them (an fp32 CPU run and a bf16 GPU run never share a result)."""
    dev = resolve_device(device)
    return {"device": dev.type, "dtype": str(resolve_dtype(dtype, dev)).removeprefix("torch.")}


def numerics(device: str = "auto", dtype: str = "auto") -> dict[str, str]:
    """:func:`precision` and the versions of the libraries that compute a figure: a torch or
    transformers upgrade can move its last digits, so a figure's cache key holds them too."""
    import transformers

    return precision(device, dtype) | {"torch": torch.__version__, "transformers": transformers.__version__}


def model_precision(model: torch.nn.Module) -> dict[str, str]:
    """:func:`precision` of a loaded model, read from its parameters."""
    p = next(model.parameters())
    return {"device": p.device.type, "dtype": str(p.dtype).removeprefix("torch.")}
