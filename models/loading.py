"""Load and save checkpoints from local directories, never from the network.

Two model families, told apart by config.json's ``model_type``: ``qwen2_audio``
(Qwen2AudioForConditionalGeneration) and Qwen2.5-Omni's thinker
(Qwen2_5OmniThinkerForConditionalGeneration: text out), from a thinker-only directory
(``qwen2_5_omni_thinker``, what the exports write) or from the whole Qwen2.5-Omni checkpoint
as published (``qwen2_5_omni``: only its thinker's config and weights are read; the talker
and the vocoder are never loaded).
A checkpoint directory looks like Qwen/Qwen2-Audio-7B-Instruct on the hub:
config.json, model.safetensors (or model.safetensors.index.json + shards), tokenizer files,
preprocessor_config.json, chat_template.jinja, generation_config.json.
Everything that is missing or broken is reported up front as a CheckpointError naming the
file (a JSON file that does not parse, a safetensors file cut short or with a garbled header,
a shard the index lists but the directory lacks), instead of a deep stack trace from
transformers or safetensors (or, worse, an attempt to reach the hub).

Weights are read from safetensors only (``use_safetensors=True``): a ``pytorch_model.bin``
is a pickle, which can run code when loaded, so it is never read, even next to safetensors.
"""

import contextlib
import json
import math
import warnings
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    GenerationConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from models import omni

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# bytes per element of each safetensors dtype
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                            "C64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


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
    """A checkpoint directory, or a file it needs, is missing or broken; the message names it."""


def _require(path, what):
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")


def read_json_file(path, what="JSON file"):
    """A JSON object from ``path``; a file that is not one is a CheckpointError naming it."""
    path = Path(path)
    _require(path, what)
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: {what} cannot be read as JSON ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def check_safetensors(path):
    """Raise CheckpointError unless ``path`` is a whole safetensors file: an 8-byte header length,
    a JSON header whose tensors have known dtypes, sizes that match their shapes, and data that
    ends exactly where the file does (a file cut short is named with both sizes). Reads only
    the header, so it costs nothing next to loading the weights."""
    path = Path(path)
    _require(path, "safetensors file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= _MAX_HEADER else b""
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    if n is None or n > _MAX_HEADER:
        raise CheckpointError(f"{path} is truncated or not safetensors: {size} bytes, "
                              f"{'no header' if n is None else f'a header of {n} bytes announced'}")
    if len(raw) < n:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header alone announces {8 + n}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: its safetensors header is not JSON ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_entry_problem(info)
        if problem:
            raise CheckpointError(f"{path}: malformed safetensors header: tensor {name!r} {problem}")
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header describes {8 + n + end}")
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: {size - (8 + n + end)} bytes after the last tensor its header describes "
                              "(not a file safetensors wrote)")


def _tensor_entry_problem(info):
    if not isinstance(info, dict):
        return "is not described by an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _SAFETENSORS_DTYPE_BYTES:
        return f"has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return f"has a malformed shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"has malformed data offsets {offsets!r}"
    if offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]:
        return f"holds {offsets[1] - offsets[0]} bytes, not the {math.prod(shape)} x {dtype} of its shape"
    return None


def check_weights(path):
    """Raise CheckpointError unless `path` holds whole safetensors weights (single file or sharded)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        check_safetensors(path / WEIGHTS_NAME)
        return
    index = path / WEIGHTS_INDEX_NAME
    if not index.is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (path / name).is_file()]
        extra = (f" ({pickled[0]} is there: pickled weights can run code when loaded and are never read; "
                 "convert them to safetensors)") if pickled else ""
        raise CheckpointError(
            f"no safetensors weights in {path}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}{extra}")
    weight_map = read_json_file(index, "weights index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: no 'weight_map' of tensor names to shard files")
    for shard in sorted(set(weight_map.values())):
        if PurePosixPath(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(f"{index}: shard {shard!r} is not a file of {path}")
        _require(path / shard, f"weight shard listed in {index.name}")
        check_safetensors(path / shard)


def check_model_files(path):
    """Everything ``load_model`` / ``load_processor`` read, checked without loading the weights."""
    path = Path(path)
    _require(path, "checkpoint directory")
    read_json_file(path / "config.json", "model config")
    check_weights(path)
    check_processor_files(path)
    if (path / "generation_config.json").is_file():
        read_json_file(path / "generation_config.json", "generation config")


def check_processor_files(path):
    """Raise CheckpointError unless the tokenizer and feature-extractor files are there and parse."""
    path = Path(path)
    _require(path, "checkpoint directory")
    if (path / "tokenizer.json").is_file():
        read_json_file(path / "tokenizer.json", "tokenizer")
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        read_json_file(path / "vocab.json", "tokenizer vocabulary")
    else:
        raise CheckpointError(
            f"tokenizer files not found in {path}: expected tokenizer.json or vocab.json + merges.txt")
    read_json_file(path / "tokenizer_config.json", "tokenizer config")
    # transformers 5 may also write the feature extractor nested in processor_config.json
    if (path / "preprocessor_config.json").is_file():
        read_json_file(path / "preprocessor_config.json", "feature extractor config")
    elif not _nested_feature_extractor(path):
        raise CheckpointError(f"feature extractor config not found: {path / 'preprocessor_config.json'}")


def _nested_feature_extractor(path):
    f = path / "processor_config.json"
    return f.is_file() and "feature_extractor" in read_json_file(f, "processor config")


def _loading(path, what, load):
    """``load()``, with whatever transformers, tokenizers or safetensors raise on a broken file
    turned into one CheckpointError naming the directory (after the checks above, rare)."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as err:
        text = str(err).strip()
        raise CheckpointError(f"{path}: the {what} cannot be loaded ({type(err).__name__}: "
                              f"{text.splitlines()[0] if text else ''})") from None


# config.json's model_type -> model class (both families' prompts go through Qwen2AudioProcessor:
# see models.omni.processor)
FAMILIES = {
    "qwen2_audio": Qwen2AudioForConditionalGeneration,
    omni.MODEL_TYPE: Qwen2_5OmniThinkerForConditionalGeneration,
}


# the whole Qwen2.5-Omni (thinker + talker + vocoder): its thinker is loaded
OMNI_WHOLE = "qwen2_5_omni"


def model_type(path) -> str:
    """The family of config.json's model_type (the whole Qwen2.5-Omni counts as its thinker's),
    checked to be one this project trains (a CheckpointError naming the file otherwise)."""
    config_file = Path(path) / "config.json"
    kind = read_json_file(config_file, "model config").get("model_type")
    if kind == OMNI_WHOLE:
        return omni.MODEL_TYPE
    if kind not in FAMILIES:
        raise CheckpointError(f"{config_file}: model_type {kind!r} is not one this project trains "
                              f"(one of {sorted(FAMILIES) + [OMNI_WHOLE]})")
    return kind


def model_class(config):
    """The model class of a config object (Qwen2AudioConfig or Qwen2_5OmniThinkerConfig)."""
    return FAMILIES[config.model_type]


def load_model(path, *, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """The model of a local checkpoint directory (the family from config.json's model_type),
    in `dtype`, on `device`."""
    path = Path(path)
    _require(path, "checkpoint directory")
    cls = FAMILIES[model_type(path)]
    check_weights(path)
    kw = dict(local_files_only=True, use_safetensors=True, dtype=dtype, attn_implementation=attn_implementation)
    if read_json_file(path / "config.json", "model config").get("model_type") == OMNI_WHOLE:
        # the thinker's own config; transformers drops the weights' "thinker." prefix and skips the talker's
        whole = _loading(path, "model config", lambda: AutoConfig.from_pretrained(path, local_files_only=True))
        kw["config"] = whole.thinker_config
    model = _loading(path, "model", lambda: cls.from_pretrained(path, **kw))
    return model.to(device)


def load_processor(path):
    """Qwen2AudioProcessor (feature extractor + tokenizer + chat template) for either family
    (models.omni.processor says why it serves the thinker too); the tokenizer pads on the left. A Qwen2.5-Omni processor carries ``system_prompt`` (the system turn the model
    expects, which data.collate puts before each prompt); Qwen2-Audio's is None (its chat
    template's default system line)."""
    path = Path(path)
    # config.json first: one that does not parse is the cause to report, not the files after it
    kind = model_type(path) if (path / "config.json").is_file() else "qwen2_audio"
    check_processor_files(path)
    processor = _loading(path, "processor", lambda: Qwen2AudioProcessor.from_pretrained(path, local_files_only=True))
    processor.system_prompt = omni.SYSTEM_PROMPT if kind == omni.MODEL_TYPE else None
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
        read_json_file(path / "generation_config.json", "generation config")
        return _loading(path, "generation config",
                        lambda: GenerationConfig.from_pretrained(path, local_files_only=True))
    read_json_file(path / "config.json", "model config")
    config = _loading(path, "model config", lambda: AutoConfig.from_pretrained(path, local_files_only=True))
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


def to_hub_key(name, *, family="qwen2_audio"):
    """The hub's name of a parameter (`family`: config.json's model_type)."""
    if family == omni.MODEL_TYPE:
        return omni.to_hub_key(name)
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
    state = {to_hub_key(k, family=config.model_type): v.detach().to("cpu").contiguous().clone() for k, v in state.items()}

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


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder and encoder layer's activations in backward (non-reentrant).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` (the old name warns and goes in 6.0); this calls
    whichever the installed release has.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --- a model without weights, for loading each rank's shards only -------------------------------


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter a module registers inside the block lives on the meta device (no memory,
    no initialisation work: an init function on a meta tensor does nothing); buffers stay real,
    so the ones computed in ``__init__`` (rotary ``inv_freq``, sinusoid tables) are right."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def weight_files(path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or index), checked whole."""
    path = Path(path)
    check_weights(path)
    if (path / WEIGHTS_NAME).is_file():
        from safetensors import safe_open

        with safe_open(path / WEIGHTS_NAME, framework="pt") as f:
            return {k: path / WEIGHTS_NAME for k in f.keys()}
    weight_map = read_json_file(path / WEIGHTS_INDEX_NAME, "weights index")["weight_map"]
    return {k: path / v for k, v in weight_map.items()}


def empty_model(path, *, dtype=torch.float32, attn_implementation="sdpa"):
    """The model of a local checkpoint, as ``load_model`` builds it, with every parameter on
    the meta device (buffers real), plus, for each state-dict entry, the name and file of the
    tensor that holds it (``{state_key: (file_key, file)}``); or ``(None, reason)`` where the
    checkpoint's names or shapes are not the model's one to one (``load_model`` then applies)."""
    path = Path(path)
    _require(path, "checkpoint directory")
    family = model_type(path)
    cls = FAMILIES[family]
    files = weight_files(path)
    whole = read_json_file(path / "config.json", "model config").get("model_type") == OMNI_WHOLE
    config = _loading(path, "model config", lambda: AutoConfig.from_pretrained(path, local_files_only=True))
    if whole:
        config = config.thinker_config
    with _parameters_on_meta():
        model = _loading(path, "model", lambda: cls._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation))
    model.eval()  # as from_pretrained returns it
    if (path / "generation_config.json").is_file():
        model.generation_config = load_generation_config(path)

    from safetensors import safe_open

    sources, shapes = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        hub = to_hub_key(name, family=family)
        candidates = [f"thinker.{hub}", f"thinker.{name}"] if whole else [hub, name]
        found = next((k for k in candidates if k in files), None)
        if found is None:
            if isinstance(tensor, torch.nn.Parameter) or tensor.device.type == "meta":
                return None, f"{name} is not in {path}'s weights (looked for {candidates})"
            continue  # a persistent buffer the file lacks keeps its computed value, as from_pretrained's
        sources[name] = (found, files[found])
        shapes[name] = tuple(tensor.shape)
    for name, (key, file) in sources.items():
        with safe_open(file, framework="pt") as f:
            stored = tuple(f.get_slice(key).get_shape())
        if stored != shapes[name]:
            return None, f"{file}: {key} has shape {list(stored)}, the model's {name} {list(shapes[name])}"
    return model, sources


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


class RowReader:
    """Rows ``[start, stop)`` of the tensors of one safetensors file, read with plain file reads
    at their byte offsets: nothing is mapped into the process, so a rank that reads half of a
    tensor holds half of it (``safe_open``'s memory map would count every page it touched)."""

    def __init__(self, path):
        self.path = Path(path)
        check_safetensors(self.path)
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n).decode("utf-8"))
        self.data_start = 8 + n
        self.file = open(self.path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def rows(self, key, start: int, stop: int) -> torch.Tensor:
        info = self.header[key]
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {key!r} has dtype {info['dtype']}, which is not read by rows")
        shape = info["shape"] or [1]
        row_bytes = math.prod(shape[1:]) * _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        self.file.seek(self.data_start + info["data_offsets"][0] + start * row_bytes)
        if self.file.readinto(out.numpy()) != out.numel():
            raise CheckpointError(f"{self.path}: tensor {key!r} ends before its rows {start}:{stop}")
        return out.view(dtype).reshape([stop - start, *shape[1:]] if info["shape"] else [])
