"""Load and save Qwen2-Audio checkpoints from local directories, never from the network.

A checkpoint directory looks like Qwen/Qwen2-Audio-7B-Instruct on the hub:
config.json, model.safetensors (or model.safetensors.index.json + shards), tokenizer files,
preprocessor_config.json, chat_template.jinja, generation_config.json.
Everything that is missing is reported up front as a CheckpointError naming the file, instead
of a deep stack trace from transformers (or, worse, an attempt to reach the hub).
"""

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    GenerationConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def quiet_transformers() -> None:
    """No weight-loading progress bars and no deprecation warnings from transformers: they are
    about its API, not the run, and would print through the training progress bar."""
    import warnings

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    for handler in transformers_logging.get_logger().handlers:  # its own handler: the library's root logger's
        handler.addFilter(lambda record: "deprecated" not in record.getMessage())


class CheckpointError(FileNotFoundError):
    """A checkpoint directory, or a file it needs, is missing."""


def _require(path, what):
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")


def check_weights(path):
    """Raise CheckpointError unless `path` holds safetensors weights (single file or sharded)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        return
    index = path / WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise CheckpointError(
            f"no safetensors weights in {path}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    for shard in shards:
        _require(path / shard, f"weight shard listed in {index.name}")


def check_processor_files(path):
    """Raise CheckpointError unless the tokenizer and feature-extractor files are there."""
    path = Path(path)
    _require(path, "checkpoint directory")
    if not ((path / "tokenizer.json").is_file()
            or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())):
        raise CheckpointError(
            f"tokenizer files not found in {path}: expected tokenizer.json or vocab.json + merges.txt")
    _require(path / "tokenizer_config.json", "tokenizer config")
    # transformers 5 may also write the feature extractor nested in processor_config.json
    if not (path / "preprocessor_config.json").is_file() and not _nested_feature_extractor(path):
        raise CheckpointError(f"feature extractor config not found: {path / 'preprocessor_config.json'}")


def _nested_feature_extractor(path):
    f = path / "processor_config.json"
    return f.is_file() and "feature_extractor" in json.loads(f.read_text())


def load_model(path, *, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """Qwen2AudioForConditionalGeneration from a local directory, in `dtype`, on `device`."""
    path = Path(path)
    _require(path, "checkpoint directory")
    _require(path / "config.json", "model config")
    check_weights(path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device)


def load_processor(path):
    """Qwen2AudioProcessor (feature extractor + tokenizer + chat template); tokenizer pads on the left."""
    path = Path(path)
    check_processor_files(path)
    processor = Qwen2AudioProcessor.from_pretrained(path, local_files_only=True)
    # prompts are left padded so that every row's completion starts at the same column
    processor.tokenizer.padding_side = "left"
    # tokenizer.apply_chat_template must render the same as processor.apply_chat_template
    if processor.chat_template and not getattr(processor.tokenizer, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def load_generation_config(path):
    """generation_config.json, or a minimal one built from config.json's eos when it is missing."""
    path = Path(path)
    _require(path, "checkpoint directory")
    if (path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(path, local_files_only=True)
    _require(path / "config.json", "model config")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text = getattr(config, "text_config", config)
    eos = getattr(text, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    pad = getattr(text, "pad_token_id", None)
    warnings.warn(f"{path / 'generation_config.json'} not found: using eos_token_id={eos} "
                  f"from config.json (the chat model also ends on <|endoftext|>: check the end tokens)")
    return GenerationConfig(eos_token_id=eos, pad_token_id=pad)


def resolve_dtype(name: str, device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU; any other name -> ``torch.<name>``."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def end_token_ids(generation_config):
    """The set of ids that end a completion, as a sorted-by-appearance list without duplicates."""
    eos = generation_config.eos_token_id
    if eos is None:
        raise ValueError("generation config has no eos_token_id: cannot tell where completions end")
    ids = [eos] if isinstance(eos, int) else list(eos)
    return list(dict.fromkeys(int(i) for i in ids))


# --- saving -----------------------------------------------------------------------------------

# transformers 5 renames the hub layout (audio_tower.*, language_model.model.*, ...) into its own
# module tree on load; writing the hub layout keeps exports loadable by transformers 4.x and vLLM too.
_HUB_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def to_hub_key(name):
    for ours, hub in _HUB_PREFIXES:
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def save_checkpoint(model_or_state_dict, config, processor, generation_config, out_dir, *,
                    max_shard_bytes=5 * 2**30):
    """Write a plain checkpoint directory that load_model / load_processor read back.

    `model_or_state_dict` is a model or a full (gathered, unsharded) state dict keyed like
    Qwen2AudioForConditionalGeneration.state_dict(); the FSDP export passes a state dict.
    Weights larger than `max_shard_bytes` are split over several files with an index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model_or_state_dict
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    # safetensors refuses aliased or strided tensors: own, contiguous CPU copies
    state = {to_hub_key(k): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

    shards, size = [{}], 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], out / WEIGHTS_NAME, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    config.save_pretrained(out)
    generation_config.save_pretrained(out)
    save_processor(processor, out)
    return out


def save_processor(processor, out_dir):
    """Tokenizer files, preprocessor_config.json and chat_template.jinja, as on the hub.

    (processor.save_pretrained in transformers 5 nests the feature extractor inside
    processor_config.json; the separate files are what every version reads.)
    """
    out = Path(out_dir)
    tokenizer = processor.tokenizer
    if processor.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    tokenizer.save_pretrained(out)  # also writes chat_template.jinja from tokenizer.chat_template
    feature_extractor = processor.feature_extractor
    assert isinstance(feature_extractor, WhisperFeatureExtractor), type(feature_extractor)
    feature_extractor.processor_class = "Qwen2AudioProcessor"
    feature_extractor.save_pretrained(out)
    if processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template)
