"""pieval.loading: the fast config reader against transformers, sources from model_args, the errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
from transformers import AutoConfig, LlamaConfig

from pieval import info, loading, rope
from pieval.errors import UserError


def _saved(root, name, config) -> str:
    config.save_pretrained(root / name)
    return str(root / name)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """config.json files as transformers 5 writes them, and LLaMA ones as transformers 4 wrote them."""
    root = tmp_path_factory.mktemp("configs")
    base = LlamaConfig(max_position_embeddings=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    out = {"base": _saved(root, "base", base)}
    for method in ("pi", "yarn", "dynamic", "ntk"):
        c = LlamaConfig.from_pretrained(out["base"])
        rope.apply(c, rope.resolve(c, scaling_factor=4, rope_method=method))
        out[method] = _saved(root, method, c)
    legacy = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}
    for name, extra in {
        "v4_plain": {"max_position_embeddings": 2048, "rope_theta": 10000.0, "rope_scaling": None},
        "v4_linear": {"max_position_embeddings": 8192, "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}},
        "v4_yarn": {"max_position_embeddings": 8192, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}},
    }.items():  # fmt: skip
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**legacy, **extra}))
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("name", ["base", "pi", "yarn", "dynamic", "ntk", "v4_plain", "v4_linear", "v4_yarn"])
def test_fast_reader_reports_what_transformers_reports(configs, name):
    fast = loading.read_config(loading.Source.of(configs[name]))
    assert isinstance(fast, types.SimpleNamespace)  # read without transformers
    assert info.describe(fast) == info.describe(AutoConfig.from_pretrained(configs[name]))


def test_other_families_legacy_configs_go_through_transformers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 4096}))
    config = loading.read_config(loading.Source.of(str(tmp_path)))
    assert not isinstance(config, types.SimpleNamespace)
    assert info.describe(config)["theta"] == AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"]


def test_pieval_info_imports_neither_torch_nor_transformers(configs):
    code = (
        "import sys; from pieval.cli import main; main(['info', sys.argv[1], '--json']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, configs["pi"]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *_, shown, imported = done.stdout.splitlines()
    assert json.loads(shown)["factor"] == 4.0
    assert imported == "[]"


def test_a_hub_id_offline_says_the_hub_is_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"'someorg/some-model' is no local folder, and the Hugging Face hub is offline"):
        loading.load_config(loading.Source.of("someorg/some-model"))


def test_a_folder_without_config_names_the_gguf_files_in_it(tmp_path):
    (tmp_path / "m.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"has no config.json but holds GGUF file\(s\) m.Q4_0.gguf: pass gguf_file=m.Q4_0.gguf"):
        loading.load_config(loading.Source.of(str(tmp_path)))
    (tmp_path / "m.Q4_0.gguf").unlink()
    with pytest.raises(UserError, match="has no config.json: pass the folder of a saved model"):
        loading.load_config(loading.Source.of(str(tmp_path)))


def test_source_from_task_metadata(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    src = loading.Source.from_metadata({"pretrained": str(tmp_path / "m.gguf"), "revision": "main"})
    assert (src.pretrained, src.gguf_file, src.revision) == (str(tmp_path), "m.gguf", "main")
    # a separate tokenizer does not take the model's GGUF file or revision
    src = loading.Source.from_metadata({"pretrained": "a/b", "gguf_file": "x.gguf", "revision": "v1", "tokenizer": "c/d"})
    assert (src.pretrained, src.gguf_file, src.revision) == ("c/d", None, None)
    assert loading.Source.from_metadata({"pretrained": None}) is None
    assert os.fspath(tmp_path) in loading.Source.of(str(tmp_path / "m.gguf")).label
