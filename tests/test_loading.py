import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import GenerationConfig

from models.loading import (CheckpointError, end_token_ids, load_generation_config, load_model, load_processor,
                            save_checkpoint)


@pytest.fixture
def ckpt_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "copy")


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


def test_roundtrip_hub_layout_and_sharding(tiny_checkpoint, tiny_processor, tmp_path):
    model = load_model(tiny_checkpoint)
    gen = load_generation_config(tiny_checkpoint)
    # the hub layout (as Qwen/Qwen2-Audio-7B-Instruct stores it), not transformers 5's module tree
    with safe_open(tiny_checkpoint / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" in keys and "audio_tower.conv1.weight" in keys
    assert not any(k.startswith("model.") for k in keys)

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


def test_dtype_is_honored(tiny_checkpoint):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


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
