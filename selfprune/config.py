"""The typed configuration of a search: one definition for the library, the CLI, the flow and prefect.yaml.

``SearchConfig`` is a frozen pydantic model. The flow takes it as its one parameter (Prefect builds
the UI form and validates deployment parameters from it), the CLI generates its ``search`` options
from its fields, and :func:`selfprune.search` takes it directly. Checks that need nothing loaded run
on construction, so a bad value fails before any model is read; checks that need the tokenizer
(does each split hold the windows asked of it?) run in :func:`selfprune.search.api.check_windows`
before the calibration pass.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError


class SearchConfig(BaseModel):
    """Self-Pruner's search settings (defaults: the paper's K=30, M=S=10, N=20)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("demo", description="demo, a local HF directory, a .gguf file, or a hub id")
    ratio: float = Field(0.5, gt=0, lt=1, description="target mean pruning rate beta, in (0, 1)")
    oracle: str = Field("ga", description="openai:MODEL | ga | random")
    base_url: str | None = Field(None, description="OpenAI-compatible server for openai:MODEL (vLLM, Ollama)")
    data: str = Field("demo", description="demo, wikitext2, or a local .txt/.md/.jsonl/.json/.parquet file")
    method: str = Field("wanda-sp", description="pruning method (its unit rankings)")
    population: int = Field(30, ge=2, description="K: population size")
    mutations: int = Field(10, ge=0, description="M: mutants per generation")
    crossovers: int = Field(10, ge=0, description="S: crossovers per generation")
    generations: int = Field(20, ge=0, description="N: generations")
    seed: int = Field(0, description="seeds the oracles: same seed, same search")
    p_max: float = Field(0.9, gt=0, le=1, description="upper bound of any layer's rate")
    samples: int = Field(128, ge=1, description="calibration windows for the activation statistics")
    calib_seqlen: int = Field(512, ge=1, description="tokens per calibration window")
    seqlen: int = Field(512, ge=1, description="tokens per perplexity window")
    fitness_windows: int = Field(8, ge=1, description="windows of the fitness split per candidate")
    test_windows: int = Field(64, ge=0, description="windows of the test split for the final score (0: all)")
    batch_size: int = Field(4, ge=1, description="windows per forward pass (calibration and perplexity)")
    random_init: bool = Field(False, description="ablation: random initial population")
    no_mutation: bool = Field(False, description="ablation: no mutation")
    no_crossover: bool = Field(False, description="ablation: no crossover")
    oracle_timeout: float = Field(120.0, gt=0, description="seconds per oracle request try")
    out: str = Field("runs/search", description="run directory (best.json, plots, evaluations.jsonl)")
    device: str = Field("auto", description="auto | cpu | cuda")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")

    @model_validator(mode="after")
    def _ratio_within_p_max(self) -> "SearchConfig":
        if self.ratio > self.p_max:
            raise ValueError(f"ratio {self.ratio} exceeds p_max {self.p_max}: lower --ratio or raise --p-max")
        return self


def search_config(**values) -> SearchConfig:
    """Build a :class:`SearchConfig`, turning pydantic's errors into one :class:`UserError` line
    per bad field, named as the CLI spells it."""
    try:
        return SearchConfig(**values)
    except ValidationError as e:
        raise UserError(config_error_message(e)) from None


def config_error_message(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        field = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "the configuration"
        got = f" (got {err['input']!r})" if err["loc"] else ""
        lines.append(f"{field}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(lines)
