"""--device map: a model spread over devices by accelerate gives the same statistics, candidates,
perplexities and exports, slices without copying the dense weights, and an offloading placement is
refused before any work. On this CPU machine every module of the map lands on the CPU; the hooks
that move activations between devices are attached all the same (accelerate's ``force_hooks``),
so the candidate path runs through them. Runs across real GPUs need a machine with several."""

from __future__ import annotations

import pytest
import torch
from helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    write_corpus(path)
    return str(path)


def hooked(model_dir):
    """The model as accelerate dispatches it over several devices: a device hook on every decoder
    layer, the embeddings and the head (here every device is the CPU)."""
    from accelerate import dispatch_model

    from selfprune.engine.models import load_model

    lm = load_model(str(model_dir), "cpu")
    names = ["model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"]
    names += [f"model.layers.{i}" for i in range(lm.model.config.num_hidden_layers)]
    dispatch_model(lm.model, {name: "cpu" for name in names}, force_hooks=True)
    assert hasattr(lm.model.model.layers[0], "_hf_hook")
    return lm


def test_a_mapped_model_prunes_scores_and_exports_as_the_plain_one(tiny_workspace, corpus, tmp_path):
    from safetensors.torch import load_file

    import selfprune
    from selfprune.engine.candidate import Structured
    from selfprune.engine.models import load_model
    from selfprune.engine.settings import Calibration, Scoring
    from selfprune.engine.workbench import Workbench
    from selfprune.export.hf import load_pruned
    from selfprune.model.ppl import perplexity

    model_dir = tiny_workspace / "model"
    calibration, scoring = Calibration(corpus, samples=4, seqlen=64), Scoring(corpus, "test", 64, 4)
    plain = Workbench(load_model(str(model_dir), "cpu"), calibration)
    structure = Structured(plain.pruner.structure([0.6, 0.1]))
    expected = plain.score(structure, scoring).ppl

    mapped = Workbench(load_model(str(model_dir), "map"), calibration)  # transformers' device_map="auto"
    assert {p.device.type for p in mapped.lm.model.parameters()} == {"cpu"}
    assert mapped.stats_key == plain.stats_key and mapped.score(structure, scoring).ppl == expected

    lm = hooked(model_dir)
    bench = Workbench(lm, calibration)
    candidate = bench.pruner.model(structure)
    # the candidate shares what it keeps whole with the dense model (no copy of the dense weights)
    assert candidate.model.embed_tokens.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    assert bench.score(structure, scoring).ppl == expected

    kwargs = dict(samples=4, calib_seqlen=64)
    ours = selfprune.prune(lm, 0.5, "owl", corpus, out=tmp_path / "mapped", **kwargs)
    theirs = selfprune.prune(str(model_dir), 0.5, "owl", corpus, device="cpu", out=tmp_path / "plain", **kwargs)
    assert ours.structure == theirs.structure
    a, b = load_file(tmp_path / "mapped" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    windows = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    assert perplexity(load_pruned(tmp_path / "mapped", device="map").model, windows).ppl == \
        perplexity(load_pruned(tmp_path / "plain", device="cpu").model, windows).ppl


def test_an_offloading_placement_is_refused(tiny_workspace):
    """With too little device memory accelerate offloads modules (to disk, here); --device map
    refuses that with the fix, since candidates are sliced from resident weights."""
    from selfprune.core.errors import UserError
    from selfprune.model.checkpoint import from_pretrained
    from selfprune.model.devices import check_resident

    model, _ = from_pretrained(str(tiny_workspace / "model"), torch.float32, device_map="auto",
                               max_memory={"cpu": 20_000}, offload_folder=str(tiny_workspace / "offload"))
    assert "disk" in set(model.hf_device_map.values())
    with pytest.raises(UserError, match="does not fit in the visible GPUs' memory.*--dtype bfloat16"):
        check_resident(model)


def test_unknown_device_names_map():
    from selfprune.core.errors import UserError
    from selfprune.model.devices import resolve_device

    with pytest.raises(UserError, match="or map"):
        resolve_device("gpu")
