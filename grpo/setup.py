"""A training run's set-up, before its first step: the inputs checked, the tiny model and the
synthetic data built when asked for, the questions read, the model(s) loaded (LoRA, trainable
parts, FSDP), the prompt limit, the held-out questions that can be used."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.audio import AudioError
from data.collate import prompt_length
from data.datasets import DataError, Sample, read_dataset
from data.quote import cut
from grpo.checkpoint import resolve_resume, step_of
from grpo.cli import same_on_every_rank, user_errors
from grpo.config import Config, ConfigError
from grpo.rundir import check_run_dir
from models.collectives import broadcast_object
from models.distributed import DistInfo, load_sharded, shard_model
from models.loading import CheckpointError, enable_activation_checkpointing, load_model, resolve_dtype
from models.lora import apply_lora
from models.policy import set_trainable

logger = logging.getLogger(__name__)


def prepare_data(cfg: Config) -> None:
    """Write the synthetic question set when asked to and absent (rank 0 only)."""
    d = cfg.data
    if d.format != "synthetic" or not d.synthetic_generate or Path(d.train_path).is_file():
        return
    from data.synthetic import generate_synthetic

    out = Path(d.train_path).parent
    tasks = d.synthetic_tasks or None
    logger.info("writing the synthetic question set to %s", out)
    generate_synthetic(out, n=d.synthetic_train_size, seed=d.synthetic_seed, tasks=tasks,
                       difficulty=d.synthetic_difficulty, split=Path(d.train_path).stem)
    if d.eval_path:
        generate_synthetic(Path(d.eval_path).parent, n=d.synthetic_eval_size, seed=d.synthetic_seed + 1,
                           tasks=tasks, difficulty=d.synthetic_difficulty, split=Path(d.eval_path).stem)


def prepare_model(cfg: Config) -> None:
    """Build the tiny model (model.tiny_family) at model.path when asked to and absent (rank 0 only)."""
    m = cfg.model
    if not m.build_tiny or (Path(m.path) / "config.json").is_file():
        return
    from data.synthetic import synthetic_corpus
    from models.tiny import build_tiny_checkpoint

    logger.info("building the tiny %s at %s", m.tiny_family, m.path)
    build_tiny_checkpoint(m.path, family=m.tiny_family, seed=m.tiny_seed, corpus=synthetic_corpus(),
                          text_hidden=m.tiny_text_hidden, text_layers=m.tiny_text_layers,
                          audio_hidden=m.tiny_audio_hidden, audio_layers=m.tiny_audio_layers)


def read_datasets(cfg: Config) -> tuple[list[Sample], list[Sample]]:
    """The training questions, and the held-out ones (the first data.eval_samples of
    data.eval_path when set; none without data.eval_path)."""
    d = cfg.data
    # a training question listing a choice twice is ambiguous for the accuracy reward and the warm-up
    train = read_dataset(d.format, d.train_path, audio_root=d.audio_root, on_error=d.on_error, unique_choices=True)
    held_out = []
    if d.eval_path:
        held_out = read_dataset(d.format, d.eval_path, audio_root=d.audio_root, on_error=d.on_error)
        if d.eval_samples:
            held_out = held_out[: d.eval_samples]
    return train, held_out


def check_inputs(cfg: Config, resume: str | None) -> None:
    """What a user can fix, checked on every rank before the process group exists (so every
    rank stops alike, and before the run directory is touched): model.path, the data files,
    the checkpoint ``resume`` names, and whether a fresh run may use run.output_dir."""
    m, d = cfg.model, cfg.data
    missing = []  # every missing input in one error: a first run may lack several
    if not m.build_tiny and not (Path(m.path) / "config.json").is_file():
        missing.append(f"model.path {m.path}: " + ("no config.json in it (not a transformers-format checkpoint "
                       "directory)" if Path(m.path).is_dir() else "directory not found"))
    built = d.format == "synthetic" and d.synthetic_generate  # written at start when absent
    data_missing = [f"{key} {path}: file not found" for key, path in
                    (("data.train_path", d.train_path), ("data.eval_path", d.eval_path))
                    if path and not built and not Path(path).is_file()]
    if missing or data_missing:
        error = DataError if data_missing else CheckpointError
        raise error("; ".join(missing + data_missing))
    # then: a directory another run is using is said before anything about what it holds
    check_run_dir(cfg.run.output_dir, resume=resume is not None, overwrite=cfg.run.overwrite)
    if resume:
        resolve_resume(cfg.run.output_dir, resume, verify=False)  # verified once the ranks can share the work


def planned_steps(cfg: Config) -> int:
    """The steps a run takes in all: the format warm-up (GRPO only), then run.steps."""
    warmup = cfg.algorithm.format_warmup_steps if cfg.algorithm.name == "grpo" else 0
    return warmup + cfg.run.steps


def settle_resume(cfg: Config, resume: str | None) -> tuple[str | None, str | None, bool]:
    """What ``--resume`` comes to in run.output_dir: (the resume to start with, None for a fresh
    start; a line to tell the user, or None; whether there is nothing to train).

    * The checkpoint to continue from is at the run's last step (:func:`planned_steps`): the run
      is finished. With ``--resume auto`` and run.overwrite=true (``make train``) a fresh run
      starts (the finished one is moved aside); otherwise nothing is trained.
    * ``--resume auto`` with run.overwrite=true and no checkpoint (a run stopped before its
      first save, or none at all): a fresh start, an earlier run moved aside.
    * Anything else: ``resume`` as given (a stopped run continues).
    """
    if not resume:
        return resume, None, False
    restart = resume == "auto" and cfg.run.overwrite
    path = resolve_resume(cfg.run.output_dir, resume, verify=False)
    if path is None:
        return (None if restart else resume), None, False
    step, total = step_of(path), planned_steps(cfg)
    if step < total:
        return resume, None, False
    finished = f"{path}: the run is finished (step {step} of {total})"
    if restart:
        return None, f"{finished}: run.overwrite=true moves it aside, and a fresh run starts", False
    return resume, (f"{finished}: nothing to train. Score it with evaluate.py, raise run.steps to train on, or "
                    "pass --resume auto run.overwrite=true to move it aside and start afresh"), True


def use_fsdp(cfg: Config, info: DistInfo) -> bool:
    if cfg.distribution.fsdp == "always":
        return True
    if cfg.distribution.fsdp == "never":
        if info.world_size > 1:
            raise ConfigError("distribution.fsdp=never needs a single process")
        return False
    return info.world_size > 1 or info.device.type == "cuda"


def rank_0_first(body, *, is_main: bool, world: int) -> None:
    """``body()`` on rank 0, then every rank: a user error there is raised on every rank
    (marked as such: one of them reports it), so no rank waits in a collective for a rank that left."""
    failure = None
    if is_main:
        try:
            body()
        except user_errors() as err:
            failure = err
    if world > 1:
        verdict = broadcast_object(None if failure is None else (type(failure), str(failure)))
        if verdict is not None and failure is None:
            kind, message = verdict
            failure = kind(message)
    if failure is not None:
        raise same_on_every_rank(failure)


def refused_low_precision_training(cfg: Config, dtype: torch.dtype) -> str:
    """Why full fine-tuning without FSDP in bf16/fp16 is refused: the weights and AdamW's state
    would be that dtype, and an update of lr 1e-6 is below bf16's resolution at a weight's
    usual size (spacing 2^-7 of |w|: about 1.2e-4 at 0.02), so nothing would change. FSDP2
    keeps fp32 master weights and computes in bf16; LoRA's adapters are fp32 whatever the base."""
    return (f"distribution.fsdp={cfg.distribution.fsdp} with model.dtype={cfg.model.dtype} ({dtype}) would train "
            f"{dtype} weights, which an update of lr {cfg.optimizer.lr:g} does not move: use distribution.fsdp=auto "
            "or always (fp32 master weights, compute in model.dtype), lora.enabled=true, or model.dtype=float32")


def load_policy_model(cfg: Config, device: torch.device, *, fsdp: bool, trainable: bool):
    """The policy (``trainable``: LoRA adapters, or the parts model.train_* name) or a frozen
    reference copy, sharded under FSDP (fp32 master weights, compute in model.dtype)."""
    dtype = torch.float32 if fsdp else resolve_dtype(cfg.model.dtype, device)
    if trainable and not fsdp and not cfg.lora.enabled and dtype != torch.float32:
        raise ConfigError(refused_low_precision_training(cfg, dtype))
    if fsdp and not (trainable and cfg.lora.enabled):
        # each rank reads only its own shards: no full fp32 copy per process in host memory
        return load_sharded(cfg.model.path, attn_implementation=cfg.model.attn_implementation,
                            prepare=lambda model: _prepare(model, cfg, trainable), **_shard_options(cfg, device, trainable))
    # LoRA adds its adapters (random, seeded) to a loaded model, so that model is loaded whole
    model = load_model(cfg.model.path, dtype=dtype, device="cpu" if fsdp else device,
                       attn_implementation=cfg.model.attn_implementation)
    _prepare(model, cfg, trainable)
    if fsdp:
        model = shard_model(model, **_shard_options(cfg, device, trainable))
    elif cfg.distribution.activation_checkpointing and trainable:
        enable_activation_checkpointing(model)
    return model


def _prepare(model, cfg: Config, trainable: bool) -> None:
    """What trains (LoRA's adapters, or the parts model.train_* name) and the mode, before sharding."""
    if trainable and cfg.lora.enabled:  # only the adapters train; before sharding and checkpoint wrappers
        lo = cfg.lora
        apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, seed=cfg.run.seed)
        model.train()
    elif trainable:
        set_trainable(model, audio_encoder=cfg.model.train_audio_encoder, projector=cfg.model.train_projector,
                      decoder=cfg.model.train_decoder)
        model.train()
    else:
        model.requires_grad_(False)
        model.eval()


def _shard_options(cfg: Config, device: torch.device, trainable: bool) -> dict:
    """shard_model's options: fp32 master weights, compute in model.dtype."""
    param_dtype = resolve_dtype(cfg.model.dtype, device)
    return dict(device=device, param_dtype=None if param_dtype == torch.float32 else param_dtype,
                cpu_offload=cfg.distribution.cpu_offload,
                activation_checkpointing=cfg.distribution.activation_checkpointing and trainable,
                reshard_after_forward=cfg.distribution.reshard_after_forward)


@dataclass
class PromptLimit:
    """Whether a question's prompt (text + audio tokens) fits: ``limit(sample, wave)``.

    Prompts are never cut (that would drop audio tokens): a prompt plus its completion must fit
    the model's context, and data.max_prompt_tokens when set. An over-long prompt is a
    DataError naming the sample, or (data.on_error=skip) False, and the stream counts it."""

    cfg: Config
    processor: object
    context: int  # the model's max_position_embeddings

    def __post_init__(self):
        room = self.context - self.cfg.rollout.max_new_tokens
        if room < 1:
            raise ConfigError(f"rollout.max_new_tokens={self.cfg.rollout.max_new_tokens} leaves no room for a "
                              f"prompt in the model's context of {self.context} tokens ({self.cfg.model.path})")
        d = self.cfg.data
        self.tokens = min(room, d.max_prompt_tokens) if d.max_prompt_tokens else room

    def __call__(self, sample: Sample, wave: np.ndarray) -> bool:
        d = self.cfg.data
        n = prompt_length(sample, len(wave), self.processor, template=d.prompt_template)
        if n <= self.tokens:
            return True
        if d.on_error != "skip":
            limit = (f"data.max_prompt_tokens={d.max_prompt_tokens}" if d.max_prompt_tokens
                     and d.max_prompt_tokens == self.tokens else
                     f"the model's context ({self.context}) minus "
                     f"rollout.max_new_tokens ({self.cfg.rollout.max_new_tokens})")
            where = f"{sample.source}: " if sample.source else ""
            raise DataError(f"{where}sample {cut(sample.id)} ({sample.audio_path}): its prompt is {n} tokens "
                            "(text + audio), "
                            f"over {self.tokens} = {limit}. Prompts are never cut; "
                            "data.on_error=skip leaves such samples out (counted)")
        return False


def usable_eval_samples(samples: list[Sample], load_audio, fits: PromptLimit, cfg: Config
                        ) -> tuple[list[Sample], int]:
    """Held-out questions whose clip loads and whose prompt fits, and how many were left out;
    the others stop the run (data.on_error=raise: AudioError naming the file, or DataError
    naming the sample) or are left out and counted (logged as eval/skipped_samples)."""
    usable, reasons = [], []
    for s in samples:
        try:
            if fits(s, load_audio(s.audio_path)):
                usable.append(s)
                continue
            reasons.append(f"{s.id}: prompt over {fits.tokens} tokens")
        except AudioError as err:
            if cfg.data.on_error != "skip":
                raise AudioError(err.path, err.reason, sample=s.where) from None
            reasons.append(f"{s.where}: {err.path}: {err.reason}")
    if reasons:
        logger.warning("%s: %d of %d held-out questions skipped (data.on_error=skip), left out of "
                       "eval/greedy_accuracy:\n  %s", cfg.data.eval_path, len(reasons), len(samples),
                       "\n  ".join(reasons[:5]) + ("\n  ..." if len(reasons) > 5 else ""))
    if not usable:
        raise DataError(f"{cfg.data.eval_path}: no usable held-out question (see the warning above)")
    return usable, len(reasons)
