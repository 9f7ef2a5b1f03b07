"""End to end on the real SmolLM2-135M demo model (fetched once into the selfprune home)."""

from __future__ import annotations

import pytest

from selfprune.engine.candidate import Dense, Structured
from selfprune.engine.models import load_model
from selfprune.engine.provenance import structured_record
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.export.hf import load_pruned, save_pruned
from selfprune.methods.structure import realized_ratio

pytestmark = [pytest.mark.demo, pytest.mark.slow]


def test_demo_prune_export_reload(real_home, tmp_path):
    bench = Workbench(load_model("demo", device="cpu"), Calibration("demo", samples=4, seqlen=128))
    arch = bench.arch
    assert (arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.hidden, arch.intermediate) == (30, 9, 3, 576, 1536)
    scoring = Scoring("demo", "test", seqlen=128, windows=2)
    dense = bench.score(Dense(), scoring).ppl
    rates = bench.pruner.allocate("owl", 0.3)
    structure = bench.pruner.structure(rates)
    assert abs(realized_ratio(arch, structure) - 0.3) < 0.005
    pruned = bench.pruner.structured(structure)
    in_memory = bench.score(Structured(structure), scoring)
    assert in_memory.tokens == 2 * 127 and dense < in_memory.ppl < 100 * dense
    out = save_pruned(pruned, bench.lm.tokenizer, tmp_path / "demo-owl", structured_record(bench.pruner, rates, structure, "owl"))
    back = load_pruned(out, device="cpu")
    from selfprune.model.ppl import perplexity

    assert perplexity(back.model, bench.scorer.windows(scoring)).ppl == pytest.approx(in_memory.ppl, rel=1e-5)
    assert sum(p.numel() for p in back.model.parameters()) < 0.8 * sum(p.numel() for p in bench.lm.model.parameters())
