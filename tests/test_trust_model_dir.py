"""Trust boundary of a model directory: its own Python runs only by an explicit flag, or when it
is selfprune's own DeciLM export, recognised by the hash of the config code selfprune writes.

vLLM is not needed: a stand-in "vLLM Python" (a real executable) records the request selfprune
hands to ``python -m selfprune_vllm.probe``, which is where ``trust_remote_code`` is decided.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from selfprune.core.errors import UserError
from selfprune.evaluate import vllm_bridge
from selfprune.export.deci import CONFIG_MODULE, export_deci
from selfprune.methods.structure import LayerKeep

PROBE = """#!{python}
import json, shutil, sys
request = json.load(open(sys.argv[3]))
shutil.copy(sys.argv[3], {record!r})
json.dump({{"ok": True}}, open(request["answer"], "w"))
"""


@pytest.fixture
def fake_vllm(tmp_path) -> tuple[str, Path]:
    """(the stand-in vLLM Python, where it copies the last request it got)."""
    record = tmp_path / "request.json"
    python = tmp_path / "vllm-python"
    python.write_text(PROBE.format(python=sys.executable, record=str(record)))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return str(python), record


def crafted_dir(root: Path, marker: Path) -> Path:
    """A model directory whose config.json maps AutoConfig to a module that creates ``marker`` on import."""
    d = root / "crafted"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 256,
                                               "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (d / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                               "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
    return d


@pytest.fixture(scope="module")
def deci_dir(tmp_path_factory) -> Path:
    """selfprune's own DeciLM export of a tiny model (as in test_evaluate_deci)."""
    from test_evaluate_deci import export_tiny

    root = tmp_path_factory.mktemp("deci")
    export_tiny("llama_mha", (LayerKeep(4, 96),) * 4, root / "pruned")
    return export_deci(root / "pruned", root / "deci")


def sent(fake_vllm, model_dir: Path, **kwargs) -> dict:
    python, record = fake_vllm
    vllm_bridge.run(python, "tokens", model_dir, **kwargs)
    return json.loads(record.read_text())


def test_a_directory_asking_to_run_its_code_is_refused_without_the_flag(tmp_path, fake_vllm):
    marker = tmp_path / "marker"
    crafted = crafted_dir(tmp_path, marker)
    with pytest.raises(UserError, match="--trust-remote-code") as err:
        sent(fake_vllm, crafted)
    assert str(crafted) in str(err.value) and "\n" not in str(err.value)
    assert not fake_vllm[1].exists()  # nothing was handed to vLLM
    assert not marker.exists()
    assert sent(fake_vllm, crafted, trust_remote_code=True)["trust_remote_code"] is True  # the user's explicit choice


def test_a_tokenizer_auto_map_counts_too(tmp_path, fake_vllm):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    with pytest.raises(UserError, match="tokenizer_config.json"):
        sent(fake_vllm, d)


def test_a_plain_directory_runs_no_code(tmp_path, fake_vllm):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert sent(fake_vllm, d)["trust_remote_code"] is False


def test_selfprune_deci_export_is_trusted_and_a_tampered_copy_is_not(deci_dir, tmp_path, fake_vllm):
    import shutil

    assert sent(fake_vllm, deci_dir)["trust_remote_code"] is True

    tampered = tmp_path / "tampered"
    shutil.copytree(deci_dir, tampered)
    code = tampered / f"{CONFIG_MODULE}.py"
    code.write_text(code.read_text() + "\nimport os  # one more line\n")
    with pytest.raises(UserError, match=f"{CONFIG_MODULE}.py .*not the one selfprune writes"):
        sent(fake_vllm, tampered)

    extra = tmp_path / "extra-map"
    shutil.copytree(deci_dir, extra)
    cfg = json.loads((extra / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = f"{CONFIG_MODULE}.DeciLMConfig"
    (extra / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="--trust-remote-code"):
        sent(fake_vllm, extra)


@pytest.mark.parametrize("command", [["vllm-check"], ["bench-model", "--vllm", "--model"]])
def test_cli_refuses_before_anything_starts_and_takes_the_flag(tmp_path, capsys, monkeypatch, command):
    marker = tmp_path / "marker"
    crafted = crafted_dir(tmp_path, marker)
    code, _, err = run_cli(capsys, monkeypatch, *command, str(crafted), "--vllm-python", sys.executable)
    assert code == 2 and str(crafted) in err and "--trust-remote-code" in err, err
    assert not marker.exists()
    # with the flag the directory is accepted; the run then stops where this machine lacks vLLM
    code, _, err = run_cli(capsys, monkeypatch, *command, str(crafted), "--vllm-python", sys.executable,
                           "--trust-remote-code")
    assert code == 2 and "vLLM is not installed" in err and "--trust-remote-code" not in err, err
    assert not marker.exists()
