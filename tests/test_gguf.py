"""pieval.gguf: the header reader against the gguf package's own reader, the rope check, file locating.

The files are written here with the gguf package's GGUFWriter (metadata only, no tensors): enough
for everything that reads a header. Loading real GGUF weights is tested on the real reference
model's file in tests/test_real_model.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pieval import gguf as pieval_gguf
from pieval import info, loading
from pieval.errors import UserError

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, *, scaling: str | None = None, endianess=None) -> Path:
    kwargs = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), "llama", **kwargs)
    w.add_name("tiny")
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(16)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<s>", "</s>", "a", "b", "ab"])  # an array of strings
    w.add_token_scores([0.0, 0.0, -1.0, -2.0, -3.0])  # an array of floats
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    if scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(scaling))
        w.add_rope_scaling_factor(4.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("endianess", [None, "big"])
def test_header_reader_agrees_with_the_gguf_package(tmp_path, endianess):
    order = gguf.GGUFEndian.BIG if endianess else None
    path = write_gguf(tmp_path / "tiny.gguf", endianess=order)
    mine = pieval_gguf.read_metadata(path)
    reference = gguf.GGUFReader(str(path), "r")
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            assert mine[key] == len(field.data), key  # arrays are reported by their length
        else:
            value = field.contents()
            assert mine[key] == pytest.approx(value) if isinstance(value, float) else mine[key] == value, key
    assert set(mine) == {k for k in reference.fields if not k.startswith("GGUF.")}
    assert pieval_gguf.config_fields(mine) == {
        "model_type": "llama",
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "hidden_size": 64,
        "num_attention_heads": 4,
    }


def test_a_stated_rope_scaling_that_transformers_drops_is_refused(tmp_path):
    path = write_gguf(tmp_path / "pi4.gguf", scaling="linear")
    metadata = pieval_gguf.read_metadata(path)
    assert pieval_gguf.stated_rope_scaling(metadata) == "linear factor 4"
    with pytest.raises(UserError, match="states RoPE scaling linear factor 4, which transformers' GGUF loader drops"):
        loading.read_config(loading.Source.of(str(path)))
    plain = write_gguf(tmp_path / "plain.gguf")
    assert pieval_gguf.stated_rope_scaling(pieval_gguf.read_metadata(plain)) is None
    assert info.describe(loading.read_config(loading.Source.of(str(plain))))["base_window"] == 4096


def test_damaged_files_are_one_line_errors(tmp_path):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:60])
    with pytest.raises(UserError, match="cut.gguf is truncated or not a GGUF file"):
        pieval_gguf.read_metadata(tmp_path / "cut.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(UserError, match="text.gguf is not a GGUF file"):
        pieval_gguf.read_metadata(tmp_path / "text.gguf")


def test_a_gguf_path_or_a_folder_and_file_name(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    assert pieval_gguf.split(str(path), None) == (str(tmp_path), "m.gguf")
    assert pieval_gguf.split(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")
    assert pieval_gguf.split("org/model", None) == ("org/model", None)  # a hub id stays as it is
    with pytest.raises(UserError, match="no GGUF file at"):
        pieval_gguf.split(str(tmp_path / "other.gguf"), None)
    with pytest.raises(UserError, match=r"gguf_file='x.gguf' is not in .* \(GGUF files there: m.gguf\)"):
        pieval_gguf.split(str(tmp_path), "x.gguf")
