import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import GenerationConfig

from conftest import both_families
from models import omni
from models.loading import (CheckpointError, end_token_ids, load_generation_config, load_model, load_processor,
                            save_checkpoint)

# the keys each family's hub checkpoints use (transformers 5.24 renames them on load)
HUB_KEYS = {"qwen2_audio": ("language_model.lm_head.weight", "audio_tower.conv1.weight",
                            "language_model.model.layers.0.self_attn.q_proj.weight"),
            omni.MODEL_TYPE: ("lm_head.weight", "audio_tower.conv1.weight", "model.layers.0.self_attn.q_proj.weight",
                              "visual.merger.mlp.0.weight")}


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "copy")


@both_families
@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                                     "preprocessor_config.json"])
def test_missing_file_is_named(ckpt_copy, missing):
    (ckpt_copy / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_model(ckpt_copy) if missing in ("config.json", "model.safetensors") else load_processor(ckpt_copy)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no_such_dir"):
        load_model(tmp_path / "no_such_dir")
    with pytest.raises(CheckpointError, match="no_such_dir"):
        load_processor(tmp_path / "no_such_dir")
    assert issubclass(CheckpointError, FileNotFoundError)


@both_families
def test_roundtrip_hub_layout_and_sharding(tiny_checkpoint, tiny_processor, tmp_path):
    model = load_model(tiny_checkpoint)
    gen = load_generation_config(tiny_checkpoint)
    # the hub layout (as Qwen/Qwen2-Audio-7B-Instruct and Qwen2.5-Omni's thinker store it), not
    # transformers 5.24's module tree
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert set(HUB_KEYS[model.config.model_type]) <= keys
    assert not any(k.startswith(("model.language_model.", "model.audio_tower.")) for k in keys)

    # a full state dict (what the FSDP export passes), split over several files
    out = save_checkpoint(model.state_dict(), model.config, tiny_processor, gen, tmp_path / "sharded",
                          max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    again = load_model(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert load_processor(out).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tiny_processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    (out / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=shards[-1]):
        load_model(out)
    (out / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(out)


@both_families
def test_dtype_is_honored(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@both_families
def test_processor_pads_left_and_has_template(tiny_processor):
    assert tiny_processor.tokenizer.padding_side == "left"
    assert tiny_processor.chat_template and tiny_processor.tokenizer.chat_template == tiny_processor.chat_template


def test_generation_config_and_end_tokens(ckpt_copy, tiny_processor):
    tok = tiny_processor.tokenizer
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_token_ids(load_generation_config(ckpt_copy)) == [im_end, eot]
    (ckpt_copy / "generation_config.json").unlink()
    with pytest.warns(UserWarning, match="generation_config.json"):
        gen = load_generation_config(ckpt_copy)
    assert end_token_ids(gen) == [im_end]
    assert end_token_ids(GenerationConfig(eos_token_id=151645)) == [151645]
    assert end_token_ids(GenerationConfig(eos_token_id=[151645, 151643])) == [151645, 151643]


# --------------------------------------------------------------------------- broken or unsafe files


def _cut(path, n=1000):
    path.write_bytes(path.read_bytes()[:n])


def _huge_header(path):
    data = path.read_bytes()
    path.write_bytes((2**40).to_bytes(8, "little") + data[8:])


def _garbled_header(path):
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))


def _wrong_length(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + data[8:8 + n].replace(b'"F32"', b'"F16"', 1) + data[8 + n:])


def _not_json(path):
    path.write_text('{"model_type": "qwen2_audio", ')


def test_an_unparsable_config_json_is_reported_before_missing_tokenizer_files(ckpt_copy):
    """The processor is what a run loads first: a broken config.json is the cause to name, not
    the files read after it."""
    _not_json(ckpt_copy / "config.json")
    (ckpt_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: model config cannot be read as JSON"):
        load_processor(ckpt_copy)


@pytest.mark.parametrize("name, harm, says", [
    ("model.safetensors", _cut, r"model\.safetensors is truncated: 1000 bytes, its header alone announces \d+"),
    ("model.safetensors", lambda p: _cut(p, p.stat().st_size - 1),
     r"model\.safetensors is truncated: \d+ bytes, its header describes \d+"),
    ("model.safetensors", lambda p: _cut(p, 5), r"model\.safetensors is truncated or not safetensors: 5 bytes"),
    ("model.safetensors", _huge_header, r"model\.safetensors is truncated or not safetensors: .* announced"),
    ("model.safetensors", _garbled_header, r"model\.safetensors: its safetensors header is not JSON"),
    ("model.safetensors", _wrong_length, r"model\.safetensors: malformed safetensors header: tensor .* holds"),
    ("config.json", _not_json, r"config\.json: model config cannot be read as JSON"),
    ("generation_config.json", _not_json, r"generation_config\.json: generation config cannot be read as JSON"),
    ("tokenizer_config.json", _not_json, r"tokenizer_config\.json: tokenizer config cannot be read as JSON"),
    ("tokenizer.json", lambda p: p.write_text("[]"), r"tokenizer\.json: tokenizer is not a JSON object"),
    ("preprocessor_config.json", _not_json, r"preprocessor_config\.json: feature extractor config cannot be read"),
])
def test_a_broken_model_file_is_one_error_naming_it(ckpt_copy, name, harm, says):
    from models.loading import check_model_files

    harm(ckpt_copy / name)
    loaders = [check_model_files]
    loaders += [load_model] if name in ("model.safetensors", "config.json") else []
    loaders += [load_generation_config] if name == "generation_config.json" else []
    loaders += [load_processor] if name.startswith(("tokenizer", "preprocessor")) else []
    for load in loaders:
        with pytest.raises(CheckpointError, match=says) as err:
            load(ckpt_copy)
        assert "\n" not in str(err.value) and str(ckpt_copy / name) in str(err.value)


def test_a_broken_or_missing_shard_of_an_index_is_named(tiny_checkpoint, tiny_processor, tmp_path):
    model = load_model(tiny_checkpoint)
    out = save_checkpoint(model.state_dict(), model.config, tiny_processor, load_generation_config(tiny_checkpoint),
                          tmp_path / "sharded", max_shard_bytes=200_000)
    index = out / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    _cut(out / shards[1])
    with pytest.raises(CheckpointError, match=rf"{shards[1]} is truncated: 1000 bytes"):
        load_model(out)
    index.write_text('{"weight_map": {"a": "../outside.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"shard '\.\./outside\.safetensors' is not a file of"):
        load_model(out)
    _not_json(index)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weights index cannot be read"):
        load_model(out)


class _RunsCode:
    """Unpickling this calls os.system: what a crafted weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickled_bin_weights_are_never_read(ckpt_copy, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"weights": _RunsCode(marker)}, ckpt_copy / "pytorch_model.bin")
    load_model(ckpt_copy)  # next to safetensors: safetensors is read
    assert not marker.exists()
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is there: pickled weights can run code"):
        load_model(ckpt_copy)
    assert not marker.exists()


@pytest.mark.parametrize("harm", ["pickle", "cut"])
def test_broken_or_pickled_lora_adapters_are_one_error_naming_the_file(tiny_checkpoint, tmp_path, harm):
    from models.lora import ADAPTER_WEIGHTS, apply_lora, load_adapters, save_adapters

    model = load_model(tiny_checkpoint)
    apply_lora(model, rank=2, alpha=4, targets=["decoder"])
    adapters = tmp_path / "adapter"
    save_adapters(dict(model.named_parameters()), adapters, rank=2, alpha=4, dropout=0.0, targets=["decoder"])
    marker = tmp_path / "code-ran"
    if harm == "pickle":
        torch.save({"x": _RunsCode(marker)}, adapters / ADAPTER_WEIGHTS)
    else:
        _cut(adapters / ADAPTER_WEIGHTS, 300)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointError, match=rf"{ADAPTER_WEIGHTS} is truncated"):
        load_adapters(model, adapters)
    assert not marker.exists()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("kind, says", [("qwen2_5_omni_talker", "talker"), ("llama", "llama"), (None, "None")])
def test_a_model_type_of_another_family_is_one_error_naming_config_json(ckpt_copy, kind, says):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["model_type"] = kind
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    for load in (load_model, load_processor):
        with pytest.raises(CheckpointError, match=rf"config\.json.*{says}"):
            load(ckpt_copy)


@both_families
def test_the_family_is_chosen_from_config_json(tiny_checkpoint, tiny_processor):
    """The tiny Qwen2.5-Omni loads as the thinker (never the talker), with the system prompt
    it expects; the tiny Qwen2-Audio keeps its chat template's default system line."""
    model = load_model(tiny_checkpoint)
    kind = json.loads((tiny_checkpoint / "config.json").read_text())["model_type"]
    assert model.config.model_type == kind
    if kind == omni.MODEL_TYPE:
        assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
        assert tiny_processor.system_prompt == omni.SYSTEM_PROMPT
    else:
        assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
        assert tiny_processor.system_prompt is None


def test_the_whole_qwen2_5_omni_checkpoint_loads_as_its_thinker(tmp_path):
    """The published layout: config.json of the whole model (model_type qwen2_5_omni, with
    thinker_config) and weights prefixed "thinker." next to the talker's: the thinker alone
    loads, with the same weights as the thinker-only directory, and the Omni system prompt."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5OmniConfig

    from models.tiny import build_tiny_checkpoint

    thinker_only = build_tiny_checkpoint(tmp_path / "thinker", family="qwen2_5_omni", seed=3)
    whole = shutil.copytree(thinker_only, tmp_path / "whole")
    (whole / "config.json").unlink()
    Qwen2_5OmniConfig(thinker_config=json.loads((thinker_only / "config.json").read_text()),
                      enable_audio_output=False).save_pretrained(whole)
    state = {"thinker." + k: v for k, v in load_file(thinker_only / "model.safetensors").items()}
    save_file({**state, "talker.codec_head.weight": torch.zeros(2, 2)}, whole / "model.safetensors",
              metadata={"format": "pt"})

    model, reference = load_model(whole), load_model(thinker_only)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert load_processor(whole).system_prompt == omni.SYSTEM_PROMPT
