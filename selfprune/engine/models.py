"""Load a supported causal LM (local dir, hub id, GGUF file, pruned export, or the demo) and
fingerprint its weights."""

from __future__ import annotations

import difflib
import threading
from functools import lru_cache
from pathlib import Path

from ..core.errors import UserError, cause
from ..data.demo import demo_model_dir
from ..export.hf import RECORD, load_pruned
from ..model.arch import Arch, arch_of
from ..model.checkpoint import LoadedModel, fingerprint, from_pretrained, read_config
from ..model.devices import MAP, check_resident, resolve_device, resolve_dtype
from ..model.headers import check_config, tensor_shapes


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``org/name``; anything else that names a file system location is a path."""
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def _resolve(spec: str) -> tuple[str, dict, Path | None]:
    """``spec`` -> (what to pass to ``from_pretrained``, its kwargs, the local path if any). A GGUF's
    header is read here, so a corrupt one is one line whatever reads it next (tokenizer, config)."""
    if spec == "demo":
        spec = str(demo_model_dir())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; pass a model directory or a .gguf file")
        tensor_shapes(path)
        return str(path.parent), {"local_files_only": True, "gguf_file": path.name}, path
    if path.is_dir():
        return str(path), {"local_files_only": True}, path
    if _looks_like_path(spec):
        raise UserError(f"model path {spec} does not exist; check the path, or use --model demo for the built-in model")
    _check_hub_id(spec)
    return spec, {}, None


HUB_PROBE_S = 3.0  # how long the hub may take to answer one request before it counts as unreachable


def _check_hub_id(spec: str) -> None:
    """A hub id must be cached locally or the hub reachable: otherwise a load would retry for a
    minute and then blame the tokenizer. One line now instead, with a close local name if any."""
    from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except HFValidationError:
        raise UserError(f"--model {spec}: no such file or directory, and not a hub id (org/name){_did_you_mean(spec)}. "
                        "Give a local model directory, a .gguf file, or demo") from None
    why = "HF_HUB_OFFLINE is set" if is_offline_mode() else None if _hub_reachable() else (
        f"{constants.ENDPOINT} did not answer within {HUB_PROBE_S:g} s")
    if why:
        raise UserError(f"--model {spec}: no such file or directory, and the hub is offline ({why}) with no cached "
                        f"copy of it{_did_you_mean(spec)}. Give a local model directory, a .gguf file, or demo, "
                        "or fetch it with the hub reachable (HF_HUB_OFFLINE unset)")


def _did_you_mean(spec: str) -> str:
    """`` (did you mean NAME?)`` for the closest of demo and the directories and .gguf files beside
    ``spec``, or nothing."""
    parent = Path(spec).parent
    names = ["demo"]
    if parent.is_dir():
        entries = (p for _, p in zip(range(1000), parent.iterdir()))  # a bounded look, never a long listing
        names += [str(parent / p.name) for p in entries if p.is_dir() or p.suffix == ".gguf"]
    match = difflib.get_close_matches(spec, names, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """Whether the hub answers one request within :data:`HUB_PROBE_S` (any HTTP status counts;
    proxies from the environment apply). In a thread: a name lookup has no timeout of its own."""
    import httpx
    from huggingface_hub import constants

    answered = threading.Event()

    def probe() -> None:
        try:
            httpx.head(constants.ENDPOINT, timeout=HUB_PROBE_S)
            answered.set()
        except httpx.HTTPError:
            pass

    threading.Thread(target=probe, daemon=True).start()
    return answered.wait(HUB_PROBE_S)


def check_model(spec: str) -> None:
    """``spec`` names a model that can be loaded, as far as that shows without loading it: demo,
    a local path (a GGUF's header reads), or a hub id cached here or with the hub reachable."""
    if spec != "demo":  # the demo model is fetched on first use: not for a check
        _resolve(spec)


def model_fingerprint(spec: str) -> str:
    """The fingerprint of ``spec`` without loading it (a hub model is fetched into the HF cache)."""
    _, _, local = _resolve(spec)
    return fingerprint(local or _hub_snapshot(spec))


def _hub_snapshot(spec: str) -> Path:
    """The local copy of hub model ``spec``, fetched into the HF cache if need be."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec))


def load_tokenizer(spec: str):
    """The tokenizer of ``spec`` alone (any form :func:`load_model` takes): enough to check a
    run's windows without reading weights, which a fully cached rerun never needs."""
    from transformers import AutoTokenizer

    source, kwargs, _ = _resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing, unreachable, malformed (a GGUF without a vocabulary)
        raise UserError(f"could not load a tokenizer for {spec!r} ({cause(e)}); give a local model "
                        "directory or .gguf file, or a hub id with the hub reachable") from None


def load_arch(spec: str) -> Arch:
    """The architecture of ``spec`` from its config, checked against a local checkpoint's weight
    headers (:mod:`selfprune.model.headers`): a second, no weight data read."""
    return _checked_arch(spec, *_resolve(spec))


def _checked_arch(spec: str, source: str, kwargs: dict, local: Path | None) -> Arch:
    config = read_config(source, repr(spec), **kwargs)
    arch = arch_of(config)
    if local is not None:
        where = f"{local} (its GGUF metadata)" if local.is_file() else str(local / "config.json")
        check_config(arch, getattr(config, "vocab_size", None), tensor_shapes(local), where)
    return arch


def load_model(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``spec``: ``demo``, a local Hugging Face directory, a ``.gguf`` file (dequantized),
    a selfprune export directory, or a hub id (needs a reachable hub).

    The architecture is checked from the config before any weights are read, so an unsupported
    model fails in a second with the list of what works; and the config against the weights'
    headers, so a config that does not fit them fails before anything is built (a hub model is
    fetched first for that).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kwargs, local = _resolve(spec)
    if local is not None and (local / RECORD).is_file():
        return load_pruned(local, device=device, dtype=dtype)
    arch = _checked_arch(spec, source, kwargs, local)  # a hub model: its config alone, before the download
    if local is None:
        local = _hub_snapshot(spec)
        source, kwargs = str(local), {"local_files_only": True}
        arch = _checked_arch(spec, source, kwargs, local)
    if device == MAP:
        model, tokenizer = from_pretrained(source, dt, device_map="auto", **kwargs)
        check_resident(model)
    else:
        model, tokenizer = from_pretrained(source, dt, **kwargs)
        model.to(dev)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, arch, model_fingerprint(spec), spec)
