"""The protocol of a figure: everything besides the pruning that changes a perplexity or an accuracy.

Published pruning numbers often fail to reproduce because the split, the window length, the
checkpoint or the seed differed unseen (WikiText-103 for WikiText-2, 2048 for 4096 tokens). So every
perplexity selfprune writes carries its protocol, and a table refuses rows whose protocols differ,
naming the field. ``seed`` is the one field a table lets differ: it is what a row of several
seeds spreads over.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .core.errors import UserError
from .data.corpora import data_fingerprint
from .model.devices import library_builds, precision

PER_ROW = ("seed",)  # fields a table's rows may differ in (shown per row)
PACKAGES = ("selfprune", "torch", "transformers", "lm_eval")


def versions() -> dict[str, str]:
    """The installed versions of the packages that compute a figure (torch's with its build, as
    the cache keys hold it)."""

    def installed(name: str) -> str:
        try:
            return version(name.replace("_", "-"))
        except PackageNotFoundError:
            return "not installed"

    builds = library_builds()
    return {f"{name}_version": builds.get(name) or installed(name) for name in PACKAGES}


def device_kind(device: str, dtype: str) -> dict[str, str]:
    """The resolved device (with the GPU's name on CUDA) and dtype."""
    p = precision(device, dtype)
    if p["device"] == "cuda":
        import torch

        p["device"] = f"cuda ({torch.cuda.get_device_name()})"
    return p


def protocol(model: str, model_fp: str, scoring: dict, measured: dict, calibration: dict | None, device: str,
             dtype: str, seed: int | None = None) -> dict:
    """The protocol of a perplexity: ``scoring`` says what was asked (data, split), ``measured`` is
    the perplexity record (the window length and count actually scored), ``calibration`` the
    statistics' data, windows and length (None: no statistics, the model as loaded); ``seed`` the
    search's, if a search chose the model."""
    return {
        "model": model, "model_fingerprint": model_fp,
        "data": scoring["data"], "data_fingerprint": data_fingerprint(scoring["data"], scoring["split"])[:16],
        "split": scoring["split"], "seqlen": measured["seqlen"], "windows": measured["windows"],
        "calibration": "none" if calibration is None else
                       f"{calibration['data']}, {calibration['samples']} x {calibration['seqlen']} tokens",
        **device_kind(device, dtype), "seed": seed, **versions(),
    }


def common(rows: list[tuple[str, dict]]) -> dict:
    """The protocol every row shares (``seed`` aside), of rows given as (label, protocol); refuses
    rows whose protocols differ, naming the field, both values and both rows."""
    (first, p), *others = rows
    for label, q in others:
        for name in dict.fromkeys([*p, *q]):
            if name in PER_ROW:
                continue
            a, b = p.get(name), q.get(name)
            if a != b:
                raise UserError(f"rows {first!r} and {label!r} were measured under different protocols: "
                                f"{name} is {a!r} and {b!r}; measure them alike (same settings and versions) to "
                                "compare them in one table")
    return {k: v for k, v in p.items() if k not in PER_ROW}


def lines(p: dict) -> list[str]:
    """The protocol as a few lines of text, printed once above a table."""
    return [
        f"model `{p['model']}` (fingerprint `{p['model_fingerprint'][:12]}`), {p['dtype']} on {p['device']}",
        f"perplexity: token-level on the **{p['split']}** split of `{p['data']}` (text sha256 "
        f"`{p['data_fingerprint']}`), {p['windows']} non-overlapping windows of {p['seqlen']} tokens",
        f"calibration: {p['calibration']}",
        "versions: " + ", ".join(f"{name} {p[f'{name}_version']}" for name in PACKAGES),
    ]

