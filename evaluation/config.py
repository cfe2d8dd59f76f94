"""The evaluation config: YAML sections ``data``, ``generation``, ``model``, ``output``.

Keys, types and allowed values are checked by grpo.config's functions (the training config's
rules); each set of allowed values is the one the training config uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from grpo.config import CHOICES, ConfigError, at_least, check_choices, check_ranges, read_into

@dataclass
class EvalDataConfig:
    format: str = "mmau"  # mmau, mmar, avqa or synthetic (AVQA-format JSONL)
    path: str = ""  # the benchmark file ("{version}" and "{template}" are replaced, also in names and dirs)
    version: str = ""  # e.g. MMAU test-mini "2024-12" (R1-AQA's numbers) or "v05.15.25"
    name: str = ""  # dataset name in TensorBoard tags and tables; default: the format
    audio_root: str | None = None  # base of relative audio paths (default: the file's folder)
    audio_channel: str = "first"  # first channel (as R1-AQA) or mean of channels
    prompt_template: int = 2  # R1-AQA prompt <1>, <2> or <3>
    on_error: str = "raise"  # raise: a bad record, clip or over-long prompt stops, named; skip: counted
    skip_missing_audio: bool = False  # with on_error=skip: leave skipped questions out (default: count them wrong)
    max_prompt_tokens: int = 0  # prompt limit (text + audio tokens); 0: the model's context minus max_new_tokens
    limit: int = 0  # evaluate only the first N questions (0: all), for quick looks
    # synthetic format only: write the set when `path` does not exist yet
    synthetic_generate: bool = False
    synthetic_size: int = 200
    synthetic_seed: int = 1
    synthetic_difficulty: str = "easy"  # easy, medium, hard or mixed
    synthetic_tasks: list[str] = field(default_factory=list)


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int = 256  # R1-AQA's completion limit
    batch_size: int = 8  # questions generated together on one rank


@dataclass
class EvalModelConfig:
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32, float16
    device: str = "auto"  # auto (cuda:<local rank> when available, else cpu), cpu or cuda


@dataclass
class EvalOutputConfig:
    dir: str = "eval/default"  # <dir>/<checkpoint name>/predictions.json, scores.json, ...
    log_dir: str | None = None  # TensorBoard directory (default: <dir>/tb); "" disables it
    progress_bar: bool = True  # tqdm on rank 0


@dataclass
class EvalConfig:
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)


_CHOICES = {
    **{key: CHOICES[key] for key in ("data.format", "data.on_error", "data.audio_channel", "data.prompt_template",
                                     "data.synthetic_difficulty", "model.dtype")},
    "model.device": ("auto", "cpu", "cuda"),
}
_RANGES = {
    "data.limit": at_least(0),
    "data.max_prompt_tokens": at_least(0),
    "data.synthetic_size": at_least(1),
    "data.synthetic_seed": at_least(0),
    "generation.max_new_tokens": at_least(1),
    "generation.batch_size": at_least(1),
}


def load_eval_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """YAML sections ``data``, ``generation``, ``model``, ``output`` + ``section.key=value`` overrides.

    Unknown keys and wrong types are ConfigErrors naming the key and the file (the checks are
    grpo.config's, shared with the training config).
    """
    config = EvalConfig()
    source = read_into(config, path, overrides)
    check_choices(config, _CHOICES, source)
    check_ranges(config, _RANGES, source)
    if not config.data.path:
        raise ConfigError(f"'data.path' is not set in {source}")
    uses_version = [k for k, v in (("data.path", config.data.path), ("data.name", config.data.name),
                                   ("output.dir", config.output.dir), ("output.log_dir", config.output.log_dir))
                    if v and "{version}" in v]
    if uses_version and not config.data.version:
        raise ConfigError(f"{uses_version[0]} in {source} uses {{version}} but 'data.version' is empty")
    return config


def expand(text: str, config: EvalConfig) -> str:
    """``{version}`` and ``{template}`` in paths and names, so versions and prompts never share files."""
    return text.replace("{version}", config.data.version).replace("{template}", str(config.data.prompt_template))


def dataset_path(config: EvalConfig) -> Path:
    return Path(expand(config.data.path, config))


def dataset_name(config: EvalConfig) -> str:
    return expand(config.data.name or config.data.format, config)


def output_dir(config: EvalConfig) -> Path:
    return Path(expand(config.output.dir, config))


def tensorboard_dir(config: EvalConfig) -> Path | None:
    if config.output.log_dir == "":
        return None
    return Path(expand(config.output.log_dir, config)) if config.output.log_dir else output_dir(config) / "tb"

