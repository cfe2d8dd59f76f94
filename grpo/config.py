"""Configuration: YAML files mapped onto dataclasses, one per section.

A config file is a mapping of sections (``run``, ``model``, ``data``, ``rollout``,
``algorithm``, ``optimizer``, ``logging``, ``checkpointing``, ``lora``, ``distribution``) to
mappings of keys. Every key is checked: an unknown key or a value of the wrong type is a
``ConfigError`` that names the key, the file and the closest valid name. Command-line
overrides are written ``section.key=value`` (the value is read as YAML, so ``3``,
``1e-6``, ``true``, ``[a, b]`` and ``{accuracy: 1.0}`` mean what they look like).

The config of a run is saved resolved (defaults filled in) in its run directory, so a
run can always be repeated from its own directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.audio import CHANNELS
from data.quote import cut, quote
from data.datasets import FORMATS, ON_ERROR
from data.prompts import TEMPLATES
from data.synthetic import DIFFICULTY_CHOICES
from grpo.algorithm import (ADVANTAGE_BASELINES, ADVANTAGE_SCALES, IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES,
                            POLICY_LOSS_TYPES, REWARD_NORMALIZATIONS, ROLLOUT_CORRECTION_MODES)
from grpo.algorithm import AdvantageSpec, CorrectionSpec, LossSpec


class ConfigError(ValueError):
    """A bad configuration: the message names the key, where it came from, and a fix."""


# --------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # run directory: logs, checkpoints, resolved config
    seed: int = 0  # seeds data order, sampling and model building
    steps: int = 1000  # training steps (one rollout, then mu optimizer updates)
    overwrite: bool = False  # a fresh run into a non-empty output_dir moves the old run aside first


@dataclass
class ModelConfig:
    path: str = ""  # local checkpoint directory (never downloaded)
    build_tiny: bool = False  # build the tiny model (of tiny_family) at `path` when it is absent
    tiny_family: str = "qwen2_audio"  # the tiny model's family: qwen2_audio or qwen2_5_omni (the thinker)
    architecture: str = ""  # --plan without a checkpoint at `path`: an architecture file (default Qwen2-Audio-7B's)
    tiny_seed: int = 0  # seed of the tiny model's random weights
    tiny_text_hidden: int = 64  # tiny model: decoder width
    tiny_text_layers: int = 2  # tiny model: decoder layers
    tiny_audio_hidden: int = 64  # tiny model: encoder width
    tiny_audio_layers: int = 2  # tiny model: encoder layers
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32
    attn_implementation: str = "sdpa"  # sdpa, eager or flash_attention_2
    train_audio_encoder: bool = True  # R1-AQA trains the whole model
    train_projector: bool = True  # audio-to-text projector trainable
    train_decoder: bool = True  # language model (embeddings, layers, head) trainable
    shared_prefix: bool = True  # log-prob passes put each prompt through the decoder once per group (same result)
    audio_real_frames: bool = True  # the audio encoder runs over the clips' real frames, not the whole window (same result)
    logprob_chunk_rows: int = 1024  # token rows per lm_head + log_softmax chunk: bounds the [rows, V] logits held at once


@dataclass
class DataConfig:
    format: str = "avqa"  # avqa, synthetic, mmau or mmar
    train_path: str = ""  # training questions (JSONL for avqa/synthetic/mmar, JSON for mmau)
    audio_root: str | None = None  # base of relative audio paths (default: the file's folder)
    eval_path: str | None = None  # held-out questions for greedy accuracy during training
    eval_every: int = 0  # evaluate every N steps (0: only at the end when eval_path is set)
    eval_samples: int = 0  # evaluate on the first N held-out questions (0: all)
    prompt_template: int = 2  # R1-AQA prompt <1>, <2> or <3>
    on_error: str = "raise"  # raise, or skip bad records and unreadable audio (counted)
    audio_channel: str = "first"  # first channel (as R1-AQA) or mean of channels
    max_prompt_tokens: int = 0  # prompt limit (text + audio tokens); 0: the model's context minus max_new_tokens
    shuffle: bool = True  # reshuffle every epoch (deterministic from run.seed)
    silence_audio: bool = False  # control experiment: replace every clip by silence
    synthetic_generate: bool = False  # write the synthetic set when train_path is absent
    synthetic_tasks: list[str] = field(default_factory=list)  # task mix (empty: all tasks)
    synthetic_train_size: int = 2000  # synthetic training questions
    synthetic_eval_size: int = 200  # synthetic held-out questions
    synthetic_difficulty: str = "easy"  # easy, medium, hard or mixed (drawn per clip)
    synthetic_seed: int = 0  # seed of the synthetic set


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16  # prompts per training step, over all ranks
    group_size: int = 8  # G: completions per prompt
    generation_batch_prompts: int = 8  # prompts generated together on a rank
    max_new_tokens: int = 256  # completion length limit
    temperature: float = 1.0  # sampling temperature (log-probs use the same)
    top_k: int = 50  # 0 disables top-k
    top_p: float = 1.0  # nucleus sampling; 1.0 disables it
    decoder: str = "static"  # decode loop: static (KV cache allocated once, written in place) or dynamic; same tokens
    compile_decoder: str = "auto"  # torch.compile the static decode step: on, off, auto (on on CUDA, off on CPU)


@dataclass
class AlgorithmConfig:
    name: str = "grpo"  # grpo, or sft (the supervised baseline)
    beta: float = 0.04  # KL coefficient; 0 loads no reference model
    kl_estimator: str = "k3"  # k1, k2 or k3
    eps_low: float = 0.2  # clip range below 1
    eps_high: float = 0.2  # clip range above 1 (DAPO clip-higher: 0.28)
    importance_level: str = "token"  # token (GRPO) or sequence (GSPO)
    loss_type: str = "grpo"  # grpo, token_mean (DAPO), dr_grpo or luspo (LUSPO, with importance_level sequence)
    advantage_scale: str = "group"  # group, batch or none (Dr. GRPO)
    advantage_eps: float = 1e-4  # added to the std of the advantage denominator
    advantage_baseline: str = "mean"  # mean (GRPO) or leave_one_out (RLOO: the mean of the other G - 1)
    reward_normalization: str = "sum_then_normalize"  # or normalize_each: each reward in its group, then the sum
    policy_loss_type: str = "clip"  # clip (GRPO), cispo, gmpo, sapo or vespo; equations in grpo/algorithm.py
    clip_ratio_c: float = 0.0  # dual clip: with A < 0 the loss stops growing past rho = c (> 1; 0 off; clip only)
    sapo_tau_pos: float = 1.0  # SAPO gate temperature for A > 0
    sapo_tau_neg: float = 1.05  # SAPO gate temperature for A < 0
    vespo_k_pos: float = 2.0  # VESPO weight phi(w) = w^k e^(lambda (1 - w)) of the sequence ratio w, for A >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # ... and for A < 0
    vespo_lambda_neg: float = 2.0
    rollout_is_level: str = "none"  # weight min(pi_old / pi_sampler, cap) on the loss: token, sequence or geometric
    rollout_is_cap: float = 2.0  # its cap C
    rollout_rs_level: str = "none"  # drop tokens (or whole completions) whose pi_old / pi_sampler leaves the band
    rollout_rs_low: float = 0.5  # the band's lower end
    rollout_rs_high: float = 2.0  # the band's upper end
    kl_importance_weighted: bool = False  # KL term weighted by pi_theta / pi_old (unbiased with mu > 1)
    top_entropy_fraction: float = 1.0  # train only on this fraction of highest-entropy loss tokens (1: all)
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N of max_new_tokens (0 off)
    overlong_penalty: float = 1.0  # weight of that reward (it goes from 0 to -1 across the buffer)
    ref_sync_every: int = 0  # reference follows the policy every N GRPO steps (TR-DPO; LoRA: merge and restart; 0 off)
    ref_sync_alpha: float = 1.0  # ref <- alpha * policy + (1 - alpha) * ref (1: a copy; LoRA needs 1)
    mu: int = 1  # optimizer updates per rollout (mu=1: the ratio is exactly 1)
    micro_batch_prompts: int = 1  # prompts (each with its G completions) per forward/backward
    mask_truncated: bool = False  # leave completions cut at max_new_tokens out of the loss
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    max_sampling_rounds: int = 3  # bound on extra rollout rounds with dynamic sampling
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    flip_advantage_sign: bool = False  # control experiment: train against the reward
    format_warmup_steps: int = 0  # label-free SFT steps (random choice as target) before GRPO
    format_warmup_lr: float = 0.0  # learning rate of the warm-up (0: optimizer.lr)


@dataclass
class OptimizerConfig:
    lr: float = 1e-6  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    schedule: str = "linear"  # constant, linear or cosine decay to zero
    warmup_steps: int = 0  # linear warm-up updates
    max_grad_norm: float = 1.0  # gradient-norm clip (0 disables)
    max_nonfinite_steps: int = 3  # stop after this many skipped non-finite steps in a row


@dataclass
class LoggingConfig:
    log_every: int = 1  # write scalars every N steps
    sample_every: int = 10  # write sample completions as text every N steps (0: never)
    num_samples: int = 2  # completions shown each time
    tensorboard: bool = True  # write TensorBoard events under <run>/tb
    progress_bar: bool = True  # tqdm bar on rank 0


@dataclass
class CheckpointingConfig:
    every: int = 100  # save every N steps (0: only at the end)
    keep_last: int = 2  # full training states kept (exports: keep_exports)
    export: bool = True  # also write a transformers-format model for evaluate.py
    keep_exports: int = 0  # hf/ exports kept: the newest N and those of the kept full states (0: all)
    export_dtype: str = "model"  # the export's weights: model (model.dtype: bfloat16 on GPU, half of fp32), or a dtype
    save_on_signal: bool = True  # SIGTERM and SIGINT save a checkpoint before exit


@dataclass
class LoraConfig:
    enabled: bool = False  # low-rank adapters (models/lora.py): the base frozen, the reference = adapters off
    rank: int = 16  # r: rank of each adapter B A
    alpha: float = 32.0  # the update is (alpha / rank) B A x
    dropout: float = 0.05  # dropout on the adapters' input (training only)
    targets: list[str] = field(default_factory=lambda: ["decoder"])  # decoder, audio_encoder, projector, or regexes


@dataclass
class DistributionConfig:
    fsdp: str = "auto"  # auto (shard when more than one process), always, never
    device: str = "auto"  # auto (the GPUs; without CUDA, the CPU for one process only), cuda, cpu
    activation_checkpointing: bool = False  # recompute layer activations in backward
    cpu_offload: bool = False  # keep parameters and optimizer state on the CPU
    reshard_after_forward: bool = True  # ZeRO-3 style; false keeps parameters gathered
    timeout_minutes: float = 30.0  # collective timeout: a rank stuck this long fails the run
    gpu_memory_gb: float = 0.0  # memory per GPU for the plan (0: the visible GPU's, or 80 without one)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)


DTYPES = ("auto", "bfloat16", "float32", "float16")  # auto: bfloat16 on GPU, float32 on CPU

# Values that must come from a fixed set: checked after loading, with the choices named.
# Each set is defined once, by the code that acts on the value.
CHOICES = {
    "model.dtype": DTYPES,
    "model.tiny_family": ("qwen2_audio", "qwen2_5_omni"),
    "data.format": FORMATS,
    "data.on_error": ON_ERROR,
    "data.audio_channel": CHANNELS,
    "data.prompt_template": TEMPLATES,
    "data.synthetic_difficulty": DIFFICULTY_CHOICES,
    "algorithm.name": ("grpo", "sft"),
    "algorithm.kl_estimator": KL_ESTIMATORS,
    "algorithm.importance_level": IMPORTANCE_LEVELS,
    "algorithm.loss_type": LOSS_TYPES,
    "algorithm.advantage_scale": ADVANTAGE_SCALES,
    "algorithm.advantage_baseline": ADVANTAGE_BASELINES,
    "algorithm.reward_normalization": REWARD_NORMALIZATIONS,
    "algorithm.policy_loss_type": POLICY_LOSS_TYPES,
    "algorithm.rollout_is_level": ROLLOUT_CORRECTION_MODES,
    "algorithm.rollout_rs_level": ROLLOUT_CORRECTION_MODES,
    "optimizer.schedule": ("constant", "linear", "cosine"),
    "distribution.fsdp": ("auto", "always", "never"),
    "distribution.device": ("auto", "cuda", "cpu"),
    "checkpointing.export_dtype": ("model", "float32", "bfloat16", "float16"),
    "rollout.decoder": ("static", "dynamic"),
    "rollout.compile_decoder": ("auto", "on", "off"),
}


@dataclass(frozen=True)
class Range:
    """An allowed interval for a number; ``low_open``/``high_open`` leave the end itself out."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        # written so that NaN is never inside: every comparison with NaN is False
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


# Every number in the config and where it makes sense; a value outside is a ConfigError
# naming the key, the value and the range. tests/test_reliability.py checks that every
# numeric key of the dataclasses is listed here.
RANGES = {
    "run.seed": at_least(0),
    "run.steps": at_least(1),
    "model.tiny_seed": at_least(0),
    "model.tiny_text_hidden": at_least(1),
    "model.tiny_text_layers": at_least(1),
    "model.tiny_audio_hidden": at_least(1),
    "model.tiny_audio_layers": at_least(1),
    "model.logprob_chunk_rows": at_least(1),
    "data.eval_every": at_least(0),
    "data.eval_samples": at_least(0),
    "data.max_prompt_tokens": at_least(0),
    "data.synthetic_train_size": at_least(1),
    "data.synthetic_eval_size": at_least(1),
    "data.synthetic_seed": at_least(0),
    "rollout.prompts_per_step": at_least(1),
    "rollout.group_size": at_least(2),  # one completion has no group to be compared with
    "rollout.generation_batch_prompts": at_least(1),
    "rollout.max_new_tokens": at_least(1),
    "rollout.temperature": above(0),
    "rollout.top_k": at_least(0),
    "rollout.top_p": Range(0, 1, low_open=True),
    "algorithm.beta": at_least(0),
    "algorithm.eps_low": Range(0, 1, high_open=True),  # 1 - eps_low must stay positive
    "algorithm.eps_high": at_least(0),
    "algorithm.advantage_eps": above(0),
    "algorithm.clip_ratio_c": at_least(0),  # 0 off; otherwise > 1 (checked in validate)
    "algorithm.sapo_tau_pos": above(0),
    "algorithm.sapo_tau_neg": above(0),
    "algorithm.vespo_k_pos": at_least(0),
    "algorithm.vespo_lambda_pos": above(0),
    "algorithm.vespo_k_neg": at_least(0),
    "algorithm.vespo_lambda_neg": above(0),
    "algorithm.rollout_is_cap": above(0),
    "algorithm.rollout_rs_low": at_least(0),
    "algorithm.rollout_rs_high": above(0),
    "algorithm.top_entropy_fraction": Range(0, 1, low_open=True),
    "algorithm.overlong_buffer": at_least(0),
    "algorithm.overlong_penalty": at_least(0),
    "algorithm.ref_sync_every": at_least(0),
    "algorithm.ref_sync_alpha": Range(0, 1, low_open=True),
    "algorithm.mu": at_least(1),
    "algorithm.micro_batch_prompts": at_least(1),
    "algorithm.max_sampling_rounds": at_least(0),
    "algorithm.format_warmup_steps": at_least(0),
    "algorithm.format_warmup_lr": at_least(0),
    "optimizer.lr": above(0),
    "optimizer.weight_decay": at_least(0),
    "optimizer.adam_eps": above(0),
    "optimizer.warmup_steps": at_least(0),
    "optimizer.max_grad_norm": at_least(0),
    "optimizer.max_nonfinite_steps": at_least(1),
    "logging.log_every": at_least(1),  # the step is taken modulo log_every
    "logging.sample_every": at_least(0),
    "logging.num_samples": at_least(0),
    "checkpointing.every": at_least(0),
    "checkpointing.keep_last": at_least(1),
    "checkpointing.keep_exports": at_least(0),
    "lora.rank": at_least(1),
    "lora.alpha": above(0),
    "lora.dropout": Range(0, 1, high_open=True),
    "distribution.timeout_minutes": above(0),
    "distribution.gpu_memory_gb": at_least(0),
}


# --------------------------------------------------------------------------- loading


def _closest(name: str, valid: list[str]) -> str:
    # difflib indexes every character of the name: a name longer than any key is no typo of one
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5) if len(name) <= 100 else []
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(valid)}"


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {quote(value)}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {quote(value)}")
        return {_check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{cut(k)}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {quote(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {quote(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {quote(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {quote(value)}")
        return value
    return value


def _apply(section_obj: Any, updates: dict, source: str, section: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    valid = [f.name for f in dataclasses.fields(section_obj)]
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(f"unknown key '{section}.{cut(key)}' in {source}{_closest(str(key), valid)}")
        setattr(section_obj, key, _check_type(value, hints[key], f"'{section}.{key}' in {source}"))


def apply_mapping(config: Config, mapping: dict, source: str) -> None:
    """Apply ``{section: {key: value}}`` onto ``config``; ``source`` names where it came from."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(mapping).__name__}")
    sections = [f.name for f in dataclasses.fields(config)]
    for section, updates in mapping.items():
        if section not in sections:
            raise ConfigError(f"unknown section '{cut(section)}' in {source}{_closest(str(section), sections)}")
        if updates is None:
            continue
        if not isinstance(updates, dict):
            raise ConfigError(f"section '{section}' in {source} must be a mapping, got {quote(updates)}")
        _apply(getattr(config, section), updates, source, section)


# Values a config may hold once its YAML aliases are expanded: a real config has a few
# hundred; a few hundred bytes of nested aliases (the "billion laughs") expand to billions.
MAX_YAML_VALUES = 100_000


def _expanded_size(node, sizes: dict) -> int:
    """Values ``node`` stands for with every alias expanded, counting each alias's target once per
    use; the walk itself visits each distinct node once (``sizes``), so it is cheap however large
    the expansion. A node that contains itself is refused."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise ConfigError("a YAML alias refers to the node that contains it")
        return sizes[key]
    sizes[key] = None  # being counted
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[key] = size
    return size


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A parser error in one line: "line L, column C: what" (PyYAML's own is several lines)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    what = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return cut(where + " ".join(str(what).split()), 300)


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, each problem a one-line ConfigError naming ``source``: a syntax
    error (line, column, what), aliases that expand past MAX_YAML_VALUES, a value YAML cannot
    build (an integer of thousands of digits, a date that does not exist)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the first characters: a control character is an error here
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"{source}: holds {size:,} values once its YAML aliases are expanded, more than "
                              f"the {MAX_YAML_VALUES:,} a config may hold: refused")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    except ConfigError as err:
        raise ConfigError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a config") from None
    except (ValueError, OverflowError) as err:  # a scalar YAML matched but cannot build
        raise ConfigError(f"{source}: a value cannot be read ({cut(err, 200)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_override(text: str) -> dict:
    """``"rollout.group_size=4"`` -> ``{"rollout": {"group_size": 4}}`` (value read as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{cut(text)}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    value = load_yaml(raw, f"override '{cut(text)}': the value") if raw != "" else ""
    return {section: {key: value}}


def check_choices(config, choices: dict, source: str) -> None:
    """Each ``section.key`` of ``choices`` must hold one of its allowed values."""
    for dotted, allowed in choices.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"'{dotted}' in {source} is {quote(value)}; choose one of {list(allowed)}")


def check_ranges(config, ranges: dict, source: str) -> None:
    """Each ``section.key`` of ``ranges`` must hold a number inside its Range."""
    for dotted, allowed in ranges.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"'{dotted}' in {source} is {quote(value)}; allowed: {key} {allowed}"
                              if allowed.high is None else
                              f"'{dotted}' in {source} is {quote(value)}; allowed: {key} in {allowed}")


def validate(config: Config, source: str, *, require_paths: bool = False) -> None:
    """Check values that must come from a fixed set or a range, and the batch arithmetic.

    ``require_paths``: model.path and data.train_path must be set (what a training run needs;
    tools that build their own model and data, like the step benchmark, leave it off).
    """
    check_choices(config, CHOICES, source)
    check_ranges(config, RANGES, source)
    betas = config.optimizer.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"'optimizer.betas' in {source} is {quote(betas)}; allowed: two numbers, each in [0, 1)")
    a = config.algorithm
    if a.clip_ratio_c != 0 and (a.clip_ratio_c <= 1 or a.policy_loss_type != "clip"):
        raise ConfigError(f"'algorithm.clip_ratio_c' in {source} is {a.clip_ratio_c!r}; allowed: 0 (off), or > 1 "
                          f"with algorithm.policy_loss_type clip (it is {a.policy_loss_type!r})")
    if a.rollout_rs_low > a.rollout_rs_high:
        raise ConfigError(f"'algorithm.rollout_rs_low' in {source} is {a.rollout_rs_low}, above "
                          f"algorithm.rollout_rs_high ({a.rollout_rs_high}): the band is empty")
    if a.ref_sync_every and a.beta == 0:
        raise ConfigError(f"'algorithm.ref_sync_every' in {source} is {a.ref_sync_every} with algorithm.beta 0: "
                          "there is no reference to sync; set beta > 0 or ref_sync_every 0")
    if a.ref_sync_every and config.lora.enabled and a.ref_sync_alpha != 1:
        raise ConfigError(f"'algorithm.ref_sync_alpha' in {source} is {a.ref_sync_alpha} with lora.enabled: the LoRA "
                          "reference follows by merging the adapters, so only 1 is allowed")
    if a.overlong_buffer > config.rollout.max_new_tokens:
        raise ConfigError(f"'algorithm.overlong_buffer' in {source} is {a.overlong_buffer}; allowed: at most "
                          f"rollout.max_new_tokens ({config.rollout.max_new_tokens})")
    if not config.run.output_dir.strip():
        raise ConfigError(f"'run.output_dir' in {source} is empty; name the run directory")
    if require_paths:
        for dotted in ("model.path", "data.train_path"):
            section, key = dotted.split(".")
            if not str(getattr(getattr(config, section), key)).strip():
                raise ConfigError(f"'{dotted}' in {source} is empty; set it in the file or as {dotted}=...")


def read_into(config, path: str | Path | None, overrides=()) -> str:
    """Apply a YAML file (if any) then ``section.key=value`` overrides to a config of
    dataclass sections; returns where the values came from, for error messages."""
    source = "the defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                              f"{err.start})") from None
        mapping = load_yaml(text, str(path)) or {}
        apply_mapping(config, mapping, str(path))
        source = str(path)
    for text in overrides:
        apply_mapping(config, parse_override(text), f"command-line override '{cut(text)}'")
    if overrides:  # a bad value may come from either
        source += " or its command-line overrides" if path is not None else " with command-line overrides"
    return source


def load_config(path: str | Path | None, overrides: list[str] = (), *, require_paths: bool = False) -> Config:
    """Read a YAML file (or only defaults when ``path`` is None), apply overrides, validate."""
    config = Config()
    validate(config, read_into(config, path, overrides), require_paths=require_paths)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# What may change when a run is resumed without it being another run: where and how it
# logs, saves and shards, and the held-out evaluation. Every other key changes the
# optimisation or the data order (seed, lr, group size, data paths, steps and so the
# schedule...): resuming with another value needs --allow-config-change. A key is free
# when it or its section is listed; new keys are protected unless added here.
RESUME_FREE = {
    "run.output_dir", "run.overwrite", "model.build_tiny", "model.attn_implementation",
    "data.eval_path", "data.eval_every", "data.eval_samples", "data.synthetic_generate", "data.synthetic_eval_size",
    "rollout.generation_batch_prompts",  # counter-based sampling: batching does not change a completion
    "rollout.decoder", "rollout.compile_decoder",  # the same tokens from either decode loop, eager or compiled
    "algorithm.micro_batch_prompts",  # the gradient is that of the whole batch, however it is split
    "logging", "checkpointing", "distribution",
}


def changes_the_run(key: str) -> bool:
    """True when ``section.key`` changes the optimisation or the data order (see RESUME_FREE)."""
    return key not in RESUME_FREE and key.split(".")[0] not in RESUME_FREE


def _flatten(mapping: dict) -> dict:
    return {f"{section}.{key}": value for section, keys in mapping.items() if isinstance(keys, dict)
            for key, value in keys.items()}


_ABSENT = "<absent>"


def config_changes(saved: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """``(section.key, saved value, new value)`` for every key that differs, in key order.

    ``defaults`` (a resolved default config): a key the saved config lacks (written before
    the key existed) is no change when the new value is its default.
    """
    old, now = _flatten(saved), _flatten(new)
    base = _flatten(defaults or {})
    return [(k, old.get(k, _ABSENT), now.get(k, _ABSENT)) for k in sorted(old.keys() | now.keys())
            if old.get(k, _ABSENT) != now.get(k, _ABSENT)
            and not (k not in old and k in base and now.get(k, _ABSENT) == base[k])]


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved configuration (defaults filled in) as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# --------------------------------------------------------------------------- the math's settings, resolved once


def loss_spec(config: Config) -> LossSpec:
    """The loss the algorithm section asks for (``grpo.algorithm.LossSpec``), built once at set-up."""
    a = config.algorithm
    return LossSpec(policy_loss_type=a.policy_loss_type, eps_low=a.eps_low, eps_high=a.eps_high,
                    importance_level=a.importance_level, clip_ratio_c=a.clip_ratio_c or None,
                    sapo_tau_pos=a.sapo_tau_pos, sapo_tau_neg=a.sapo_tau_neg,
                    vespo_shape=(a.vespo_k_pos, a.vespo_lambda_pos, a.vespo_k_neg, a.vespo_lambda_neg),
                    loss_type=a.loss_type, max_completion_length=config.rollout.max_new_tokens,
                    beta=a.beta, kl_estimator=a.kl_estimator, kl_importance_weighted=a.kl_importance_weighted)


def advantage_spec(config: Config) -> AdvantageSpec:
    """How the algorithm section turns rewards into advantages (``grpo.algorithm.AdvantageSpec``)."""
    a = config.algorithm
    return AdvantageSpec(scale=a.advantage_scale, baseline=a.advantage_baseline, eps=a.advantage_eps,
                         normalization=a.reward_normalization, flip_sign=a.flip_advantage_sign)


def correction_spec(config: Config) -> CorrectionSpec:
    """The sampler/trainer gap's correction the algorithm section asks for (``grpo.algorithm.CorrectionSpec``)."""
    a = config.algorithm
    return CorrectionSpec(is_level=a.rollout_is_level, is_cap=a.rollout_is_cap, rs_level=a.rollout_rs_level,
                          rs_low=a.rollout_rs_low, rs_high=a.rollout_rs_high)
