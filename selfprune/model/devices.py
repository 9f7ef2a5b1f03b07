"""--device / --dtype resolution, shared by every command."""

from __future__ import annotations

import torch

from ..core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAP = "map"  # accelerate's device_map="auto": the layers spread over every visible GPU


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU; so is ``map`` (the first GPU holds the
    embeddings, where inputs go; :func:`selfprune.engine.models.load_model` spreads the layers)."""
    if device in ("auto", MAP):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda, or map (a model larger than one GPU)")
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


def check_resident(model: torch.nn.Module) -> None:
    """A model spread by accelerate keeps every weight resident on a device of its own: a module
    offloaded to CPU RAM or disk lives on the meta device between forwards, and a candidate is
    built by slicing the resident dense weights, so offloading is refused before any work."""
    placed = getattr(model, "hf_device_map", None) or {}
    offloaded = [name for name, where in placed.items()
                 if where == "disk" or (where == "cpu" and torch.cuda.is_available())]
    if offloaded:
        raise UserError(f"--device map: the model does not fit in the visible GPUs' memory; accelerate would offload "
                        f"{len(offloaded)} modules ({', '.join(offloaded[:3])}, ...) to CPU or disk, and candidates are "
                        "sliced from resident weights. Make more GPUs visible, or use --dtype bfloat16")


def numerics(device: str = "auto", dtype: str = "auto") -> dict[str, str]:
    """:func:`precision` and the versions of the libraries that compute a figure: a torch or
    transformers upgrade can move its last digits, so a figure's cache key holds them too."""
    return precision(device, dtype) | library_builds()


def library_builds() -> dict[str, str]:
    """torch's and transformers' versions as the modules report them: torch's carries its build
    (``2.13.0+cpu``, ``2.13.0+cu130``), which the package metadata leaves out."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def model_precision(model: torch.nn.Module) -> dict[str, str]:
    """:func:`precision` of a loaded model, read from its parameters."""
    p = next(model.parameters())
    return {"device": p.device.type, "dtype": str(p.dtype).removeprefix("torch.")}
