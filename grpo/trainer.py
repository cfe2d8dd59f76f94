"""The GRPO trainer (and the SFT baseline) for Qwen2-Audio, on one CPU core or many GPUs.

One GRPO step reads top to bottom on one screen (``Trainer.grpo_step``: ``rollout``, then
``policy_update``, next to each other):

    rollout    B prompts -> G completions each (``_sample_round``)
    rewards    each completion scored; with dynamic sampling, more rounds (``_select_groups``)
    advantages group-normalised over the global batch (``_advantages``)
    reference  log pi_ref of the completions (only when beta > 0; ``_reference_logprobs``)
    update     mu passes of micro-batches, gradients accumulated with the whole
               batch's normalisation (``_update_pass``), one clip and one AdamW step per pass
    metrics    reduced over the ranks (``_rollout_metrics``, ``_update_metrics``)

Every rank holds B / world_size prompts with all G of their completions, so each group
lives on one rank. Gradients are averaged across ranks by FSDP; the loss of each
micro-batch is its share of the *global* batch loss, times world_size, so that the
averaged gradient is the gradient of the whole batch.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from data.audio import AudioError, AudioLoader
from data.collate import prompt_length
from data.datasets import DataError, Sample, read_dataset
from data.prompts import answer_target
from grpo.algorithm import (completion_mask, entropy_threshold, follow_policy_, high_entropy_mask,
                            multi_reward_advantages, policy_loss, rollout_correction)
from grpo.checkpoint import (ResumeError, SaveError, load_checkpoint, resolve_resume, rng_state, save_checkpoint,
                             set_rng_state)
from grpo.config import Config, ConfigError
from grpo.rewards import accuracy_reward, check_reward_names, compute_rewards, soft_overlong_punishment
from grpo.rollout import (
    completion_seeds,
    decode_completions,
    greedy_answers,
    pad_right,
    prompt_batch,
    sample_completions,
    sampling_settings,
    select_prompts,
    slice_prompts,
)
from grpo.cli import alike_on_every_rank, same_on_every_rank, user_errors
from grpo.rundir import check_run_dir, prepare_run_dir, record_config
from grpo.stream import PromptStream
from models.distributed import DistInfo, export_checkpoint, full_state_dict, gathered_params, shard_model
from models.loading import (CheckpointError, enable_activation_checkpointing, load_generation_config, load_model,
                            load_processor, resolve_dtype)
from models.lora import adapters_disabled, apply_lora, merge_adapters_, merged_state_dict, save_adapters
from models.policy import policy_logprobs, set_trainable

logger = logging.getLogger(__name__)


class Round(NamedTuple):
    """One rollout round on this rank: B questions, G completions each, N = B*G."""

    samples: list[Sample]  # [B] the questions
    waves: list[np.ndarray]  # [B] their clips, [S_b] float32 each
    prompts: dict  # input_ids [B, P], attention_mask [B, P], input_features [B, M, F], feature_attention_mask [B, F]
    ids: torch.Tensor  # [N, T] sampled tokens, padded after the end token
    texts: list[str]  # [N] the completions as text, cut before the end token
    rewards: torch.Tensor  # [B, G] total reward of each completion
    per_reward: dict[str, list[float]]  # reward name -> [N] that reward alone
    sampler_logp: torch.Tensor | None = None  # [N, T] the sampler's log-probs of ids (0 after the end)


class Trajectory(NamedTuple):
    """One rank's share of a rollout, ready for the update; B prompts, G completions each, N = B*G."""

    samples: list[Sample]  # [B] the questions
    prompts: dict  # input_ids [B, P], attention_mask [B, P], input_features [B, M, F], feature_attention_mask [B, F]
    completion_ids: torch.Tensor  # [N, T] sampled tokens, padded after the end token
    mask: torch.Tensor  # [N, T] bool, tokens that enter the loss
    advantages: torch.Tensor  # [N] A_i
    old_logp: torch.Tensor | None  # [N, T] log pi_old, only when mu > 1
    ref_logp: torch.Tensor | None  # [N, T] log pi_ref, only when beta > 0
    total_tokens: int  # loss tokens of the whole batch, all ranks
    sampler_logp: torch.Tensor | None = None  # [N, T] log-probs the rollout computed while sampling
    token_weights: torch.Tensor | None = None  # [N, T] 0/1, the high-entropy tokens, only when top_entropy_fraction < 1


# --------------------------------------------------------------------------- small pure helpers


def lr_at(update: int, total_updates: int, cfg) -> float:
    """Learning rate of optimizer update ``update`` (0-based): linear warm-up, then the schedule."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (update - cfg.warmup_steps) / max(total_updates - cfg.warmup_steps, 1)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, this micro-batch's share of the token mean.

    L = -(1 / |all target tokens|) * sum_{i,t} log pi(y_it)     logp, mask: [N, T]
    """
    return -(logp * mask).sum() / max(total_tokens, 1)


def sft_targets(tokenizer, answers: list[list[str]], template: int, end_id: int, pad_id: int):
    """The SFT step's targets, K per question (K: the most answers of any question), as groups.

    Each target is ``answer_target(answer)`` plus the end token. A question with fewer than K
    answers repeats its first, masked out, so every question is a group of K rows and its
    prompt goes through the decoder once. Returns ids [B*K, T] (right padded with pad_id),
    mask [B*K, T] (the real targets' tokens) and K.
    """
    K = max(len(a) for a in answers)
    rows = [tokenizer(answer_target(x, template), add_special_tokens=False)["input_ids"] + [end_id]
            for a in answers for x in a + a[:1] * (K - len(a))]
    ids = pad_right([torch.tensor([r], dtype=torch.long) for r in rows], pad_id)  # [B*K, T]
    lengths = torch.tensor([len(r) if i % K < len(answers[i // K]) else 0 for i, r in enumerate(rows)])  # [B*K]
    mask = torch.arange(ids.shape[1]) < lengths[:, None]  # [B*K, T]
    return ids, mask, K


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --------------------------------------------------------------------------- set-up


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


def check_inputs(cfg: Config, resume: str | None) -> None:
    """What a user can fix, checked on every rank before the process group exists (so every
    rank stops alike, and before the run directory is touched): model.path, the data files,
    the checkpoint ``resume`` names, and whether a fresh run may use run.output_dir."""
    m, d = cfg.model, cfg.data
    if not m.build_tiny and not (Path(m.path) / "config.json").is_file():
        raise CheckpointError(f"model.path {m.path}: " + ("no config.json in it (not a transformers-format "
                              "checkpoint directory)" if Path(m.path).is_dir() else "directory not found"))
    built = d.format == "synthetic" and d.synthetic_generate  # written at start when absent
    for key, path in (("data.train_path", d.train_path), ("data.eval_path", d.eval_path)):
        if path and not built and not Path(path).is_file():
            raise DataError(f"{key} {path}: file not found")
    if resume:
        resolve_resume(cfg.run.output_dir, resume, verify=False)  # verified once the ranks can share the work
    check_run_dir(cfg.run.output_dir, resume=resume is not None, overwrite=cfg.run.overwrite)


def use_fsdp(cfg: Config, info: DistInfo) -> bool:
    if cfg.distribution.fsdp == "always":
        return True
    if cfg.distribution.fsdp == "never":
        if info.world_size > 1:
            raise ConfigError("distribution.fsdp=never needs a single process")
        return False
    return info.world_size > 1 or info.device.type == "cuda"


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds what a run needs between steps; each stage is a method listing its steps."""

    def __init__(self, cfg: Config, info: DistInfo, *, resume: str | None = None, allow_config_change: bool = False):
        """``resume``: "latest" or a checkpoint path; ``allow_config_change``: resume although keys
        that change the optimisation or the data order differ from the saved config."""
        self.run_lock = None
        try:
            self._set_up(cfg, info, resume, allow_config_change)
        except BaseException:  # a run that fails to start leaves its directory unlocked
            if self.run_lock is not None:
                self.run_lock.release()
            raise

    def _set_up(self, cfg: Config, info: DistInfo, resume: str | None, allow_config_change: bool) -> None:
        """Steps: run directory -> data -> model(s) -> optimizer -> stream -> logging -> optional resume."""
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.rank, self.world = info.rank, info.world_size
        self.run_dir = Path(cfg.run.output_dir)
        self.is_main = self.rank == 0
        with alike_on_every_rank():  # the same config on every rank
            check_reward_names(cfg.algorithm.rewards)
            if cfg.rollout.prompts_per_step % self.world:
                raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple "
                                  f"of the number of processes ({self.world})")
            self.resume_path = resolve_resume(self.run_dir, resume) if resume else None
        self.local_prompts = cfg.rollout.prompts_per_step // self.world

        # 1. the run directory (locked for the run's lifetime), then data (built once by rank 0)
        self._rank_0_first(lambda: self._prepare_run(resume, allow_config_change))
        with alike_on_every_rank():  # every rank reads the same files: set-up errors are the same on each
            self._set_up_data_and_model(cfg, info)
        if self.resume_path is not None:
            self._resume(self.resume_path)

    def _prepare_run(self, resume: str | None, allow_config_change: bool) -> None:
        """Rank 0: lock the run directory, record the config, build the model and data if asked to."""
        cfg = self.cfg
        self.run_lock = prepare_run_dir(self.run_dir, resume=resume is not None, overwrite=cfg.run.overwrite)
        record_config(self.run_dir, cfg, self.resume_path, allow_change=allow_config_change)
        if resume and self.resume_path is None:  # --resume auto, nothing saved yet
            logger.warning("--resume %s: no checkpoint in %s: starting fresh at step 0", resume, self.run_dir)
            self._truncate_history(0)  # what an earlier attempt logged describes no saved state
        prepare_model(cfg)
        prepare_data(cfg)

    def _rank_0_first(self, body) -> None:
        """``body()`` on rank 0, then every rank: a user error there is raised on every rank
        (marked as such: one of them reports it), so no rank waits in a collective for a rank that left."""
        failure = None
        if self.is_main:
            try:
                body()
            except user_errors() as err:
                failure = err
        if self.world > 1:
            verdict = [None if failure is None else (type(failure), str(failure))]
            dist.broadcast_object_list(verdict, src=0)
            if verdict[0] is not None and failure is None:
                kind, message = verdict[0]
                failure = kind(message)
        if failure is not None:
            raise same_on_every_rank(failure)

    def _set_up_data_and_model(self, cfg: Config, info: DistInfo) -> None:
        """Steps 1-5 after the run directory: data, model(s), optimizer, stream, logging."""
        d = cfg.data
        # a training question listing a choice twice is ambiguous for the accuracy reward and the warm-up
        self.train_samples = read_dataset(d.format, d.train_path, audio_root=d.audio_root, on_error=d.on_error,
                                          unique_choices=True)
        self.tasks = sorted({s.task for s in self.train_samples if s.task})  # question types, for metrics
        self.eval_samples = []
        if d.eval_path:
            self.eval_samples = read_dataset(d.format, d.eval_path, audio_root=d.audio_root, on_error=d.on_error)
            if d.eval_samples:
                self.eval_samples = self.eval_samples[: d.eval_samples]

        # 2. model, processor, reference
        self.processor = load_processor(cfg.model.path)
        self.tokenizer = self.processor.tokenizer
        gen_cfg = load_generation_config(cfg.model.path)
        self.generation_config = gen_cfg
        self.sampling = sampling_settings(self.tokenizer, gen_cfg, max_new_tokens=cfg.rollout.max_new_tokens,
                                          temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k,
                                          top_p=cfg.rollout.top_p)
        self.end_ids = self.sampling.end_token_ids
        self.fsdp = use_fsdp(cfg, info)
        if cfg.lora.enabled:  # LoRA's dropout draws from the global RNG: seeded, so a LoRA run repeats exactly
            torch.manual_seed(cfg.run.seed + self.rank)
        self.model = self._load_model(trainable=True)
        self.ref_model = None
        # with LoRA the reference is the same model with its adapters off: no second copy
        if cfg.algorithm.name == "grpo" and cfg.algorithm.beta > 0 and not cfg.lora.enabled:
            self.ref_model = self._load_model(trainable=False)

        # prompts are never cut (that would drop audio tokens): a prompt plus its completion must fit the context
        context = self.model.config.text_config.max_position_embeddings
        room = context - cfg.rollout.max_new_tokens
        if room < 1:
            raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt "
                              f"in the model's context of {context} tokens ({cfg.model.path})")
        self.max_prompt_tokens = min(room, d.max_prompt_tokens) if d.max_prompt_tokens else room

        # 3. optimizer: AdamW over what is trainable; the learning rate is set per update
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)
        self.warmup_steps = cfg.algorithm.format_warmup_steps if cfg.algorithm.name == "grpo" else 0
        self.total_steps = self.warmup_steps + cfg.run.steps
        self.total_updates = cfg.run.steps * (cfg.algorithm.mu if cfg.algorithm.name == "grpo" else 1)

        # 4. the data stream of this rank
        self.load_audio = AudioLoader(max_seconds=self.processor.feature_extractor.chunk_length,
                                      channel=d.audio_channel)
        self.stream = PromptStream(self.train_samples, self.load_audio, seed=cfg.run.seed, rank=self.rank,
                                   world_size=self.world, shuffle=d.shuffle, on_error=d.on_error,
                                   keep=self._prompt_fits, silence=d.silence_audio)
        self.eval_skipped = 0
        if self.eval_samples:  # now, not at the first evaluation: a bad clip stops the run before step 1
            self.eval_samples = self._usable_eval_samples(self.eval_samples)

        # 5. counters, logging, signals
        self.step, self.update, self.nonfinite_in_a_row, self.nonfinite_total = 0, 0, 0, 0
        self.stop_requested = False
        self.signal_received = 0  # the number of the signal that asked to stop
        self.stopped_by_signal = 0  # set when the run stopped (after saving) because of it
        self.saved_step = None  # the step of the newest checkpoint this run wrote or resumed from
        self.applied_updates = 0  # optimizer steps taken (warm-up included): did a failed step change the weights?
        self.writer = None
        if self.is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if cfg.checkpointing.save_on_signal:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    # ----------------------------------------------------------------- set-up helpers

    def _load_model(self, trainable: bool):
        cfg = self.cfg
        # Under FSDP the master weights stay fp32 and compute runs in bf16 (mixed precision).
        dtype = torch.float32 if self.fsdp else resolve_dtype(cfg.model.dtype, self.device)
        model = load_model(cfg.model.path, dtype=dtype, device="cpu" if self.fsdp else self.device,
                           attn_implementation=cfg.model.attn_implementation)
        if trainable and cfg.lora.enabled:  # only the adapters train; before sharding and checkpoint wrappers
            lo = cfg.lora
            apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets,
                       seed=cfg.run.seed)
            model.train()
        elif trainable:
            set_trainable(model, audio_encoder=cfg.model.train_audio_encoder, projector=cfg.model.train_projector,
                          decoder=cfg.model.train_decoder)
            model.train()
        else:
            model.requires_grad_(False)
            model.eval()
        if self.fsdp:
            param_dtype = resolve_dtype(cfg.model.dtype, self.device)
            model = shard_model(
                model,
                device=self.device,
                param_dtype=None if param_dtype == torch.float32 else param_dtype,
                cpu_offload=cfg.distribution.cpu_offload,
                activation_checkpointing=cfg.distribution.activation_checkpointing and trainable,
                reshard_after_forward=cfg.distribution.reshard_after_forward,
            )
        elif cfg.distribution.activation_checkpointing and trainable:
            enable_activation_checkpointing(model)
        return model

    def _prompt_fits(self, sample: Sample, wave: np.ndarray) -> bool:
        """True when the prompt fits ``max_prompt_tokens``; an over-long one is a DataError naming
        the sample, or (data.on_error=skip) False, and the stream counts it."""
        n = prompt_length(sample, len(wave), self.processor, template=self.cfg.data.prompt_template)
        if n <= self.max_prompt_tokens:
            return True
        if self.cfg.data.on_error != "skip":
            d = self.cfg.data
            limit = (f"data.max_prompt_tokens={d.max_prompt_tokens}" if d.max_prompt_tokens
                     and d.max_prompt_tokens == self.max_prompt_tokens else
                     f"the model's context ({self.model.config.text_config.max_position_embeddings}) minus "
                     f"rollout.max_new_tokens ({self.cfg.rollout.max_new_tokens})")
            raise DataError(f"sample {sample.id} ({sample.audio_path}): its prompt is {n} tokens (text + audio), "
                            f"over {self.max_prompt_tokens} = {limit}. Prompts are never cut; "
                            "data.on_error=skip leaves such samples out (counted)")
        return False

    def _usable_eval_samples(self, samples: list[Sample]) -> list[Sample]:
        """Held-out questions whose clip loads and whose prompt fits; the others stop the run
        (data.on_error=raise: AudioError naming the file, or DataError naming the sample)
        or are left out and counted in ``eval_skipped`` (logged as eval/skipped_samples)."""
        usable, reasons = [], []
        for s in samples:
            try:
                wave = self.load_audio(s.audio_path)
                if self._prompt_fits(s, wave):
                    usable.append(s)
                    continue
                reasons.append(f"{s.id}: prompt over {self.max_prompt_tokens} tokens")
            except AudioError as err:
                if self.cfg.data.on_error != "skip":
                    raise
                reasons.append(f"{s.id}: {err}")
        self.eval_skipped = len(reasons)
        if reasons:
            logger.warning("%s: %d of %d held-out questions skipped (data.on_error=skip), left out of "
                           "eval/greedy_accuracy:\n  %s", self.cfg.data.eval_path, len(reasons), len(samples),
                           "\n  ".join(reasons[:5]) + ("\n  ..." if len(reasons) > 5 else ""))
        if not usable:
            raise DataError(f"{self.cfg.data.eval_path}: no usable held-out question (see the warning above)")
        return usable

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        logger.warning("signal %d: saving a checkpoint after this step, then stopping", signum)
        self.stop_requested = True
        self.signal_received = signum

    # ----------------------------------------------------------------- the GRPO step: read these three first

    def grpo_step(self) -> dict:
        """One GRPO step on this rank's B questions (N = B*G completions): ``rollout`` runs
        stages 1-5 without gradients and hands a Trajectory to ``policy_update`` (stages 6-8)."""
        traj, metrics, texts = self.rollout(self.step)
        metrics.update(self.policy_update(traj))
        self._last_texts = (traj.samples, texts)
        return metrics

    @torch.no_grad()
    def rollout(self, step: int) -> tuple[Trajectory, dict, list[str]]:
        """Stages 1-5 of a GRPO step, in order:

          1. rollout: B questions from the stream, G completions each from the policy;
          2. rewards: every completion scored against its question (in the round);
          3. dynamic sampling (DAPO, optional): more rounds, all ranks in lockstep, until every
             rank holds B groups whose rewards differ; those groups first;
          4. advantages over the global batch, and the loss mask of the completions;
          5. log pi_old (only when mu > 1) and the reference log-probs (only when beta > 0).
        Returns the Trajectory for the update, the rollout's metrics and the completion texts.
        """
        a = self.cfg.algorithm
        self.model.eval()
        t0 = time.perf_counter()

        # 1-2. rollout and rewards
        rounds = [self._sample_round(step, 0)]
        # 3. dynamic sampling (the loop's condition is a collective: every rank runs the same rounds)
        while a.dynamic_sampling and len(rounds) <= a.max_sampling_rounds and self._short_of_signal(rounds):
            rounds.append(self._sample_round(step, len(rounds)))
        batch = self._select_groups(rounds) if a.dynamic_sampling else rounds[0]
        ids = self._pad_to_global_width(batch.ids)  # [N, T], the same T on every rank
        sampler_logp = pad_right([batch.sampler_logp], 0.0, ids.shape[1])  # [N, T]
        t_rollout = time.perf_counter() - t0

        # 4. advantages and the loss mask
        mask, lengths, ended = self._loss_mask(ids)  # [N, T] bool, [N] tokens, [N] bool
        all_rewards = self._gather(batch.rewards.reshape(-1).float())  # [W*N], every rank's rewards
        names = list(batch.per_reward)
        per_reward = torch.tensor([batch.per_reward[k] for k in names], dtype=torch.float32)
        all_per_reward = self._gather(per_reward.reshape(len(names), len(batch.texts)).T.contiguous())  # [W*N, K]
        advantages = self._advantages(all_rewards, all_per_reward, names)  # [N], this rank's slice

        # 5. log pi_old and log pi_ref of the completions
        t1 = time.perf_counter()
        token_weights = None
        if a.top_entropy_fraction < 1.0:  # the selection needs the entropies of pi_old: one pass gives both
            logp, entropy = self._logprobs(self.model, batch.prompts, ids, with_entropy=True)  # [N, T] each
            old_logp = logp if a.mu > 1 else None
            token_weights = self._high_entropy_weights(entropy, mask)  # [N, T]
        else:
            old_logp = self._logprobs(self.model, batch.prompts, ids) if a.mu > 1 else None  # [N, T]
        t_old = time.perf_counter() - t1
        ref_logp = self._reference_logprobs(batch.prompts, ids)  # [N, T] or None
        t_ref = time.perf_counter() - t1 - t_old
        self.model.train()

        total_tokens = int(self._all_reduce(mask.sum().reshape(1).cpu()).item())  # loss tokens, all ranks
        timings = {"rollout": t_rollout, "old_logp": t_old, "reference": t_ref}
        metrics = self._rollout_metrics(rounds, batch, all_rewards, lengths, ended, timings)
        if token_weights is not None:
            metrics["train/entropy_selected_frac"] = self._sum(token_weights.float().cpu()) / max(total_tokens, 1)
        traj = Trajectory(batch.samples, batch.prompts, ids, mask, advantages.to(self.device), old_logp, ref_logp,
                          total_tokens, sampler_logp, token_weights)
        return traj, metrics, batch.texts

    def policy_update(self, traj: Trajectory) -> dict:
        """Stages 6-8 of a GRPO step, in order:

          6. mu passes over the batch, micro-batch by micro-batch: log pi_theta, the loss share
             of the whole batch, backward (gradients accumulate; ``_update_pass``);
          7. an optimizer step after each pass (clip, skip if not finite, AdamW);
          8. metrics over all ranks; the loss and gradient norm are means over the mu passes.
        """
        t0 = time.perf_counter()
        sums: dict[str, float] = {}  # token-weighted statistics of all passes, this rank
        gap = torch.zeros(3, dtype=torch.float64)  # sampler/trainer |log-prob difference|: [sum, max, tokens]
        losses, norms, trained_tokens = [], [], 0  # [mu] loss share, [mu] global gradient norm
        for k in range(self.cfg.algorithm.mu):
            loss, tokens = self._update_pass(traj, sums, gap if k == 0 else None)
            norms.append(self._optimizer_step(loss))
            losses.append(loss)
            trained_tokens += tokens
        metrics = self._update_metrics(sums, losses, norms, trained_tokens, time.perf_counter() - t0)
        metrics.update(self._sampler_gap_metrics(gap))
        return metrics

    def _sampler_gap_metrics(self, gap: torch.Tensor) -> dict:
        """The sampler/trainer gap over all ranks: mean and max over the loss tokens of
        |log-prob the rollout sampled with - log pi_old the loss uses| (the old-policy pass when
        mu > 1, else the first update pass; both under the sampling temperature, over the whole
        vocabulary). Near 0 in fp32; in bf16 the KV-cache decoding and the packed forward round
        differently (benchmarks/RESULTS.md gives sizes); a large value means the loss scores
        tokens under another distribution than the sampler's."""
        total, tokens = self._all_reduce(gap[[0, 2]].clone()).tolist()
        largest = self._all_reduce(gap[1:2].clone(), dist.ReduceOp.MAX).item()
        return {"train/sampler_logprob_diff/mean": total / max(tokens, 1.0),
                "train/sampler_logprob_diff/max": largest}

    # ----------------------------------------------------------------- rollout: sampling

    @torch.no_grad()
    def _sample_round(self, step: int, round_: int) -> Round:
        """Take B questions from the stream, sample G completions each, decode and score them."""
        cfg, G = self.cfg, self.cfg.rollout.group_size
        samples, waves = self.stream.take(self.local_prompts)
        prompts = prompt_batch(samples, waves, self.processor, cfg.data.prompt_template, self.device)
        with self._rollout_context():
            ids, sampler_logp = sample_completions(
                self.model, prompts, self.sampling, group_size=G,
                chunk_prompts=cfg.rollout.generation_batch_prompts,
                row_seeds=completion_seeds(cfg.run.seed, step, round_, self.stream.positions, G),
                sync_ranks=self.fsdp, real_frames=cfg.model.audio_real_frames, return_logprobs=True,
            )  # [N, T] each
        texts = decode_completions(self.tokenizer, ids, self.end_ids)
        rewards, per_reward = compute_rewards(texts, [s for s in samples for _ in range(G)], cfg.algorithm.rewards)
        if cfg.algorithm.overlong_buffer > 0:  # DAPO's length reward: on token counts, so computed here
            lengths = completion_mask(ids, self.end_ids).sum(dim=1).tolist()  # [N], end token included
            per_reward["overlong"] = [
                soft_overlong_punishment(n, cfg.rollout.max_new_tokens, cfg.algorithm.overlong_buffer) for n in lengths]
            rewards = [r + cfg.algorithm.overlong_penalty * p for r, p in zip(rewards, per_reward["overlong"])]
        return Round(samples, waves, prompts, ids, texts, torch.tensor(rewards).view(-1, G), per_reward, sampler_logp)

    def _select_groups(self, rounds: list[Round]) -> Round:
        """Dynamic sampling (DAPO): keep the B groups whose rewards differ first, then fill
        with all-equal groups (zero advantage) if the rounds ran out, their prompts gathered from the rounds."""
        G, B = self.cfg.rollout.group_size, self.local_prompts
        groups = [(r, i) for r in rounds for i in range(len(r.samples))]
        informative = [g for g in groups if g[0].rewards[g[1]].std() > 0]
        rest = [g for g in groups if g[0].rewards[g[1]].std() == 0]
        chosen = (informative + rest)[:B]
        samples = [r.samples[i] for r, i in chosen]
        waves = [r.waves[i] for r, i in chosen]
        width = max(r.ids.shape[1] for r in rounds)
        return Round(
            samples=samples, waves=waves,
            prompts=select_prompts([(r.prompts, i) for r, i in chosen], self.processor.tokenizer.pad_token_id),
            ids=pad_right([r.ids[i * G : (i + 1) * G] for r, i in chosen], self.sampling.pad_token_id, width),
            texts=[t for r, i in chosen for t in r.texts[i * G : (i + 1) * G]],
            rewards=torch.stack([r.rewards[i] for r, i in chosen]),
            per_reward={k: [v for r, i in chosen for v in r.per_reward[k][i * G : (i + 1) * G]]
                        for k in rounds[0].per_reward},
            sampler_logp=pad_right([r.sampler_logp[i * G : (i + 1) * G] for r, i in chosen], 0.0, width),
        )

    def _loss_mask(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens that enter the loss [N, T] (up to and including the first end token; none of a
        completion cut at the length limit with algorithm.mask_truncated), the completion
        lengths [N] (end token included) and which completions ended [N]."""
        mask = completion_mask(ids, self.end_ids)  # [N, T]
        ended = torch.isin(ids, torch.as_tensor(self.end_ids, device=ids.device)).any(dim=1)  # [N]
        lengths = mask.sum(dim=1)
        if self.cfg.algorithm.mask_truncated:
            mask = mask & ended[:, None]
        return mask, lengths, ended

    def _advantages(self, all_rewards: torch.Tensor, all_per_reward: torch.Tensor, names: list[str]) -> torch.Tensor:
        """This rank's slice [N] of the advantages of the global batch's rewards [W*N] (each reward
        alone [W*N, K], K = names): every rank normalises all of them (so scale="batch" uses the
        std of the whole batch); the sign is flipped for the control experiment."""
        a = self.cfg.algorithm
        weights = torch.tensor([a.overlong_penalty if k == "overlong" else a.rewards[k] for k in names])  # [K]
        if a.reward_normalization == "sum_then_normalize":  # the totals, as summed by compute_rewards
            all_per_reward, weights = all_rewards[:, None], torch.ones(1)
        advantages = multi_reward_advantages(all_per_reward, weights, self.cfg.rollout.group_size,
                                             a.reward_normalization, scale=a.advantage_scale,
                                             eps=a.advantage_eps, baseline=a.advantage_baseline)
        n_local = all_rewards.numel() // self.world
        advantages = advantages[self.rank * n_local : (self.rank + 1) * n_local]
        return -advantages if a.flip_advantage_sign else advantages

    # ----------------------------------------------------------------- rollout: collectives

    def _short_of_signal(self, rounds: list[Round]) -> bool:
        """True while any rank has fewer than B groups whose rewards differ."""
        informative = sum(int((r.rewards.std(dim=1) > 0).sum()) for r in rounds)
        short = torch.tensor([float(informative < self.local_prompts)])
        return self._all_reduce(short, dist.ReduceOp.MAX).item() != 0

    def _pad_to_global_width(self, ids: torch.Tensor) -> torch.Tensor:
        """Every rank pads its completions to the widest rank's, so micro-batches line up."""
        width = int(self._all_reduce(torch.tensor([ids.shape[1]]), dist.ReduceOp.MAX))
        return pad_right([ids], self.sampling.pad_token_id, width)

    def _all_reduce(self, values: torch.Tensor, op=None) -> torch.Tensor:
        if dist.is_initialized():
            values = values.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
        return values

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    def _mean(self, x: torch.Tensor) -> float:
        pair = self._all_reduce(torch.tensor([x.sum().item(), x.numel()], dtype=torch.float64))
        return (pair[0] / pair[1].clamp(min=1)).item()

    def _sum(self, x: torch.Tensor) -> float:
        return self._all_reduce(torch.tensor([x.sum().item()], dtype=torch.float64)).item()

    def _rollout_context(self):
        return gathered_params(self.model) if self.fsdp else nullcontext()

    # ----------------------------------------------------------------- rollout: metrics

    def _rollout_metrics(self, rounds: list[Round], batch: Round, all_rewards: torch.Tensor, lengths: torch.Tensor,
                         ended: torch.Tensor, timings: dict[str, float]) -> dict:
        """Rewards, lengths and timings of the rollout, over all ranks. all_rewards [W*N];
        lengths [N] completion tokens (end token included); ended [N]."""
        G = self.cfg.rollout.group_size
        first = rounds[0]  # frac_reward_zero_std and the per-task numbers: before dynamic sampling
        zero_std_first = (first.rewards.std(dim=1) == 0).float() if G > 1 else torch.ones(self.local_prompts)  # [B]
        group_std = all_rewards.view(-1, G).std(dim=1) if G > 1 else torch.zeros(all_rewards.numel())
        metrics = {
            "train/reward": all_rewards.mean().item(),
            "train/reward_std": group_std.mean().item(),
            "train/frac_reward_zero_std": self._mean(zero_std_first),
            "train/completions/mean_length": self._mean(lengths.float()),
            "train/completions/clipped_ratio": self._mean((~ended).float()),
            "train/sampling_rounds": float(len(rounds)),
            **{f"timing/{name}": seconds for name, seconds in timings.items()},
            "perf/generated_tokens_per_second": self._sum(lengths.float()) / max(timings["rollout"], 1e-9),
        }
        for name, values in batch.per_reward.items():
            metrics[f"train/rewards/{name}/mean"] = self._mean(torch.tensor(values))
        if len(self.tasks) > 1 and "accuracy" in first.per_reward:  # which question types carry signal
            accuracy = torch.tensor(first.per_reward["accuracy"]).view(-1, G).mean(dim=1)  # [B]
            for name, per_group in (("rewards/accuracy", accuracy), ("frac_reward_zero_std", zero_std_first)):
                for task, value in self._per_task_means(first.samples, per_group).items():
                    metrics[f"train/{name}/{task}"] = value
        return metrics

    def _per_task_means(self, samples: list[Sample], values: torch.Tensor) -> dict[str, float]:
        """Mean of ``values`` [B] over each task's questions, over all ranks (same tasks on every rank)."""
        sums = torch.zeros(2, len(self.tasks), dtype=torch.float64)  # [sum, count] per task
        for s, v in zip(samples, values.tolist()):
            sums[0, self.tasks.index(s.task)] += v
            sums[1, self.tasks.index(s.task)] += 1
        sums = self._all_reduce(sums).cpu()
        return {t: (sums[0, i] / sums[1, i]).item() for i, t in enumerate(self.tasks) if sums[1, i] > 0}

    # ----------------------------------------------------------------- log-probabilities

    def _micro_batches(self, n_prompts: int):
        step = self.cfg.algorithm.micro_batch_prompts
        return [(i, min(i + step, n_prompts)) for i in range(0, n_prompts, step)]

    def _group_logprobs(self, model, prompts: dict, lo: int, hi: int, ids: torch.Tensor, with_entropy=False,
                        temperature: float | None = None):
        """log pi(o_t) of the completions of prompts lo..hi: ids [(hi-lo)*G, T] -> [(hi-lo)*G, T]
        (and entropy): each clip encoded once, each prompt through the decoder once per group.
        Under the sampling temperature unless ``temperature`` is given."""
        m = self.cfg.model
        temperature = self.cfg.rollout.temperature if temperature is None else temperature
        return policy_logprobs(model, slice_prompts(prompts, lo, hi), ids, temperature=temperature,
                               with_entropy=with_entropy, shared_prefix=m.shared_prefix,
                               real_frames=m.audio_real_frames)

    def _logprobs(self, model, prompts: dict, ids: torch.Tensor, with_entropy: bool = False):
        """log pi(o_t) of given completions under ``model``, micro-batch by micro-batch: [N, T]
        (and the entropies [N, T] with ``with_entropy``)."""
        G = ids.shape[0] // prompts["input_ids"].shape[0]
        parts = [self._group_logprobs(model, prompts, lo, hi, ids[lo * G : hi * G], with_entropy=with_entropy)
                 for lo, hi in self._micro_batches(prompts["input_ids"].shape[0])]
        if with_entropy:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)

    def _high_entropy_weights(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, T] 0/1: this rank's loss tokens among the top algorithm.top_entropy_fraction of the
        whole batch's (all ranks) by entropy under pi_old: one threshold for the batch, so the
        selection does not depend on the micro-batching or the number of ranks."""
        all_entropy = self._gather(entropy.detach().float())  # [W*N, T], every rank pads to one T
        all_mask = self._gather(mask.to(all_entropy.dtype)).bool()
        threshold = entropy_threshold(all_entropy, all_mask, self.cfg.algorithm.top_entropy_fraction)
        return high_entropy_mask(entropy.float(), mask, threshold).float()

    def _reference_logprobs(self, prompts: dict, ids: torch.Tensor) -> torch.Tensor | None:
        """log pi_ref [N, T] of the completions ids [N, T], or None when beta == 0 (no KL term).

        The reference is the frozen copy loaded at start (refreshed after the format
        warm-up), or, with LoRA, the policy itself with its adapters switched off.
        """
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, prompts, ids)
        if self.cfg.lora.enabled and self.cfg.algorithm.beta > 0:
            with adapters_disabled(self.model):
                return self._logprobs(self.model, prompts, ids)
        return None

    # ----------------------------------------------------------------- update

    def _update_pass(self, traj: Trajectory, sums: dict[str, float], gap: torch.Tensor | None = None
                     ) -> tuple[float, int]:
        """One pass over the batch, micro-batch by micro-batch: log pi_theta (and entropy) of the
        completions, the GRPO loss share with the global counts, backward. Adds the statistics,
        weighted by loss tokens, to ``sums``; returns this rank's loss share and the tokens
        through the model (prompt rows x G + loss tokens). ``gap`` (the first pass only): adds
        [sum, max, count] of |sampler log-prob - log pi_old| over the loss tokens, log pi_old being
        the old-policy pass (mu > 1) or this pass's own log-probs (mu = 1: what the loss uses)."""
        cfg, a = self.cfg, self.cfg.algorithm
        G = cfg.rollout.group_size
        n_prompts = len(traj.samples)
        loss_total, trained_tokens = 0.0, 0
        for lo, hi in self._micro_batches(n_prompts):
            c = slice(lo * G, hi * G)
            mask = traj.mask[c]
            width = max(int(mask.any(dim=0).nonzero().max().item()) + 1, 1) if mask.any() else 1
            ids, mask = traj.completion_ids[c, :width], mask[:, :width]  # trim padding columns
            logp, entropy = self._group_logprobs(self.model, traj.prompts, lo, hi, ids, with_entropy=True)
            old = traj.old_logp[c, :width] if traj.old_logp is not None else logp.detach()
            if gap is not None and traj.sampler_logp is not None and mask.any():
                diff = (traj.sampler_logp[c, :width] - old).abs()[mask]  # [loss tokens of this micro-batch]
                gap[0] += diff.sum().item()
                gap[1] = max(gap[1].item(), diff.max().item())
                gap[2] += diff.numel()
            ref = traj.ref_logp[c, :width] if traj.ref_logp is not None else None
            weights = traj.token_weights[c, :width] if traj.token_weights is not None else None
            sampler = traj.sampler_logp[c, :width] if traj.sampler_logp is not None else None
            weights, correction = rollout_correction(  # the sampler/trainer gap, off unless configured
                old, sampler, mask, weights, is_level=a.rollout_is_level, is_cap=a.rollout_is_cap,
                rs_level=a.rollout_rs_level, rs_low=a.rollout_rs_low, rs_high=a.rollout_rs_high)
            loss, stats = policy_loss(
                logp, old, traj.advantages[c], mask, ref_logp=ref, beta=a.beta if ref is not None else 0.0,
                kl_estimator=a.kl_estimator, eps_low=a.eps_low, eps_high=a.eps_high,
                importance_level=a.importance_level, loss_type=a.loss_type,
                max_completion_length=cfg.rollout.max_new_tokens,
                total_sequences=n_prompts * G * self.world, total_tokens=traj.total_tokens,
                policy_loss_type=a.policy_loss_type, clip_ratio_c=a.clip_ratio_c or None,
                sapo_tau_pos=a.sapo_tau_pos, sapo_tau_neg=a.sapo_tau_neg, token_weights=weights,
                vespo_shape=(a.vespo_k_pos, a.vespo_lambda_pos, a.vespo_k_neg, a.vespo_lambda_neg),
                kl_importance_weighted=a.kl_importance_weighted,
            )
            stats.update(correction)  # logged as train/rollout_is/..., train/rollout_rs/...
            # FSDP averages gradients over ranks; the share times world_size makes it a sum.
            (loss * self.world).backward()
            loss_total += loss.item()
            tokens = float(mask.sum().item())
            trained_tokens += int(traj.prompts["attention_mask"][lo:hi].sum()) * G + int(tokens)  # prompt rows x G
            for key, value in stats.items():
                if key != "tokens":
                    sums[key] = sums.get(key, 0.0) + float(value) * tokens
            sums["entropy"] = sums.get("entropy", 0.0) + float((entropy.detach() * mask).sum())
            sums["tokens"] = sums.get("tokens", 0.0) + tokens
        return loss_total, trained_tokens

    def _update_metrics(self, sums: dict[str, float], losses: list[float], norms: list[float], trained_tokens: int,
                        t_update: float) -> dict:
        """Token-weighted means of the loss statistics over all ranks; the loss and gradient norm
        as means over the mu passes."""
        keys = sorted(sums)
        reduced = self._all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
        totals = dict(zip(keys, reduced.tolist()))
        tokens = max(totals.pop("tokens"), 1.0)
        metrics = {f"train/{k}": v / tokens for k, v in totals.items()}  # token-weighted means
        metrics.update({
            "train/loss": float(self._all_reduce(torch.tensor(losses, dtype=torch.float64)).mean().item()),
            "train/grad_norm": sum(norms) / len(norms),
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
            "timing/update": t_update,
            "perf/train_tokens_per_second": self._sum(torch.tensor([float(trained_tokens)])) / max(t_update, 1e-9),
        })
        return metrics

    def _optimizer_step(self, loss_value: float, lr: float | None = None) -> float:
        """Clip, check for non-finite values, step; returns the gradient norm."""
        o = self.cfg.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        loss_sum = float(self._all_reduce(torch.tensor([loss_value], dtype=torch.float64)).item())
        if not (math.isfinite(norm) and math.isfinite(loss_sum)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            logger.warning("non-finite loss (%s) or gradient norm (%s): update skipped (%d in a row, %d in all)",
                           loss_sum, norm, self.nonfinite_in_a_row, self.nonfinite_total)
            if self.nonfinite_in_a_row >= o.max_nonfinite_steps:
                raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite updates in a row: stopping "
                                         f"(optimizer.max_nonfinite_steps={o.max_nonfinite_steps})")
            return norm
        self.nonfinite_in_a_row = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr if lr is not None else lr_at(self.update, self.total_updates, o)
        self.optimizer.step()
        self.applied_updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        if lr is None:  # warm-up updates do not advance the schedule
            self.update += 1
        return norm

    # ----------------------------------------------------------------- SFT

    def sft_step(self, label_free: bool, lr: float | None = None) -> dict:
        """One supervised step: the target ``<answer>{choice}</answer>`` plus the end token.

        Steps:
          1. take B questions; the target is the correct choice, or, for the label-free
             format warm-up, every choice of the question once, each with the same weight
             (the format is learned, and the answer is pulled towards uniform over the
             choices: accuracy stays at chance and GRPO's groups start with the most
             reward variance; one random choice per question would leave a random bias);
          2. for each micro-batch: log pi of the target tokens, each question's targets as
             one group (its clip encoded once, its prompt through the decoder once),
             token-mean NLL share over the whole batch; backward;
          3. clip and AdamW step.
        """
        cfg = self.cfg
        samples, waves = self.stream.take(self.local_prompts)
        answers = [s.choices if label_free else [s.answer] for s in samples]  # targets of each question
        ids, mask, K = sft_targets(self.tokenizer, answers, cfg.data.prompt_template, self.end_ids[0],
                                   self.sampling.pad_token_id)  # [B*K, T] each
        ids, mask = ids.to(self.device), mask.to(self.device)
        prompts = prompt_batch(samples, waves, self.processor, cfg.data.prompt_template, self.device)
        total_tokens = int(self._all_reduce(mask.sum().reshape(1).cpu()).item())
        t0 = time.perf_counter()
        loss_total = 0.0
        for lo, hi in self._micro_batches(len(samples)):
            logp = self._group_logprobs(self.model, prompts, lo, hi, ids[lo * K : hi * K], temperature=1.0)
            loss = sft_loss(logp, mask[lo * K : hi * K], total_tokens)
            (loss * self.world).backward()
            loss_total += loss.item()
        grad_norm = self._optimizer_step(loss_total, lr=lr)
        return {
            "train/loss": float(self._all_reduce(torch.tensor([loss_total], dtype=torch.float64)).item()),
            "train/grad_norm": grad_norm,
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
            "timing/update": time.perf_counter() - t0,
        }

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def greedy_accuracy(self, samples: list[Sample] | None = None) -> dict[str, float]:
        """Greedy accuracy (the accuracy reward) on held-out questions, over all ranks:
        ``{"": overall, task: accuracy on that task's questions, ...}``.

        Every rank runs the same number of batches (short shards are padded with
        repeats that do not count), so generation stays in lockstep under FSDP.
        """
        samples = self.eval_samples if samples is None else samples
        if not samples:
            return {"": float("nan")}
        tasks = sorted({s.task for s in samples if s.task})
        per_rank = math.ceil(len(samples) / self.world)
        mine = samples[self.rank :: self.world]
        weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
        mine = mine + [samples[0]] * (per_rank - len(mine))
        batch = self.cfg.rollout.generation_batch_prompts
        correct = torch.zeros(1 + len(tasks), dtype=torch.float64)  # [overall, per task]
        self.model.eval()
        with self._rollout_context():
            for lo in range(0, per_rank, batch):
                chunk = mine[lo : lo + batch]
                waves = [self.load_audio(s.audio_path) for s in chunk]
                if self.cfg.data.silence_audio:
                    waves = [np.zeros_like(w) for w in waves]
                ids = greedy_answers(self.model, self.processor, chunk, waves, self.sampling,
                                     template=self.cfg.data.prompt_template, device=self.device,
                                     batch_prompts=batch, sync_ranks=self.fsdp)  # [b, T]
                texts = decode_completions(self.tokenizer, ids, self.end_ids)
                for t, s, w in zip(texts, chunk, weights[lo : lo + batch]):
                    hit = w * accuracy_reward(t, s)
                    correct[0] += hit
                    if s.task in tasks:
                        correct[1 + tasks.index(s.task)] += hit
        self.model.train()
        correct = self._all_reduce(correct).tolist()
        counts = [len(samples)] + [sum(s.task == t for s in samples) for t in tasks]
        return dict(zip([""] + tasks, (c / n for c, n in zip(correct, counts))))

    # ----------------------------------------------------------------- checkpoints

    def close(self) -> None:
        """Flush and close the curves, release the run directory (the lock), and drop the model,
        the reference and the optimizer: they hold the process group, which
        ``models.distributed.cleanup`` must tear down before the interpreter exits. The trainer
        is not used afterwards."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None
        self.model = self.ref_model = self.optimizer = None

    def save(self) -> Path:
        """Full training state plus (optionally) a transformers-format export."""
        def export(out_dir):
            export_checkpoint(self.model, self.processor, self.generation_config, out_dir)

        lo = self.cfg.lora

        def export_lora(out_dir):  # the merged model as a plain checkpoint, and the adapters alone
            if self.cfg.checkpointing.export:
                export_checkpoint(self.model, self.processor, self.generation_config, out_dir,
                                  transform=lambda state: merged_state_dict(state, lo.alpha / lo.rank))
            adapters = full_state_dict(self.model, trainable_only=True)
            if self.is_main:
                save_adapters(adapters, Path(out_dir).parent / "adapter", rank=lo.rank, alpha=lo.alpha,
                              dropout=lo.dropout, targets=lo.targets)

        trainer_state = {
            "update": self.update,
            "nonfinite_total": self.nonfinite_total,
            "world_size": self.world,
        }
        path = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, trainer_state,
                               {"stream": self.stream.state_dict()}, rank=self.rank,
                               keep_last=self.cfg.checkpointing.keep_last,
                               export_fn=export_lora if lo.enabled else
                               export if self.cfg.checkpointing.export else None,
                               extra_models=self._saved_models(), frozen=self._base_changed(self.step))
        self.saved_step = self.step
        if self.is_main:
            logger.info("checkpoint written: %s", path)
        return path

    def _saved_models(self) -> dict:
        # After a format warm-up the reference is a snapshot of the policy, not the
        # checkpoint on disk, so it must be saved with the run to be restored.
        # So is a reference that follows the policy.
        moved = self.warmup_steps or self.cfg.algorithm.ref_sync_every
        return {"reference": self.ref_model} if self.ref_model is not None and moved else {}

    def _reference_sync_due(self, step: int) -> bool:
        """Whether the reference follows the policy after ``step`` (every ref_sync_every GRPO steps)."""
        every, grpo_steps = self.cfg.algorithm.ref_sync_every, step - self.warmup_steps
        return (self.cfg.algorithm.name == "grpo" and every > 0 and grpo_steps > 0 and grpo_steps % every == 0
                and (self.ref_model is not None or self.cfg.lora.enabled))

    def _base_changed(self, step: int) -> bool:
        """Whether the weights besides the trainable ones differ from model.path at ``step``,
        so a checkpoint must hold them: always without LoRA (everything trains); with LoRA,
        once the format warm-up's adapters (or, with a reference that follows the policy, GRPO's)
        were merged into the base."""
        every = self.cfg.algorithm.ref_sync_every
        return (not self.cfg.lora.enabled or 0 < self.warmup_steps <= step
                or (every > 0 and self.warmup_steps + every <= step))

    @torch.no_grad()
    def snapshot_reference(self) -> None:
        """pi_ref <- pi_theta (after the format warm-up: the KL anchors GRPO to the model that
        formats, as R1-AQA's reference is the instruction-tuned model it starts from).

        With LoRA the warm-up's adapters are merged into the base weights and fresh adapters
        start (B = 0): the model computes the same, and "adapters off" (the reference) is
        now the warmed-up model; GRPO's adapters start again from B A = 0.
        """
        if self.cfg.lora.enabled:
            merge_adapters_(self.model, seed=self.cfg.run.seed)
            return
        for ref_p, p in zip(self.ref_model.parameters(), self.model.parameters()):
            ref_p.copy_(p)

    @torch.no_grad()
    def sync_reference(self) -> None:
        """The reference follows the policy (``follow_policy_``): pi_ref <- alpha pi_theta +
        (1 - alpha) pi_ref. With LoRA the adapters are merged into the base and start again
        (alpha is 1): "adapters off" is then the current policy; their AdamW moments, which
        belonged to the merged adapters, are cleared."""
        if self.cfg.lora.enabled:
            merge_adapters_(self.model, seed=self.cfg.run.seed)
            self.optimizer.state.clear()
            return
        follow_policy_(self.ref_model.parameters(), self.model.parameters(), self.cfg.algorithm.ref_sync_alpha)

    def _resume(self, path: Path) -> None:
        saved_step = json.loads((path / "trainer_state.json").read_text())["step"]
        trainer_state, rank_state = load_checkpoint(path, self.model, self.optimizer, rank=self.rank,
                                                    extra_models=self._saved_models(),
                                                    frozen=self._base_changed(saved_step),
                                                    verify=False)  # resolve_resume verified it
        if trainer_state.get("world_size", self.world) != self.world:
            raise same_on_every_rank(ResumeError(f"{path} was saved by {trainer_state['world_size']} processes; "
                             f"resume it with the same number (now {self.world})"))
        self.step, self.update = trainer_state["step"], trainer_state["update"]
        self.saved_step = self.step
        self.nonfinite_total = trainer_state.get("nonfinite_total", 0)
        self.stream.load_state_dict(rank_state["stream"])
        if self.is_main:
            self._truncate_history(self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    def _truncate_history(self, step: int) -> None:
        """Drop history lines after ``step``: a run that crashed after its last checkpoint
        logged steps that the resumed run will log again."""
        path = self.run_dir / "history.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            if len(kept) < len(lines):
                path.write_text("".join(kept))
                logger.info("history.jsonl: dropped %d line(s) after step %d", len(lines) - len(kept), step)

    # ----------------------------------------------------------------- the loop

    def train_step(self) -> dict:
        """One step: the label-free format warm-up, an SFT step, or a GRPO step."""
        a = self.cfg.algorithm
        if a.name == "sft":
            return self.sft_step(label_free=False)
        if self.step < self.warmup_steps:
            return self.sft_step(label_free=True, lr=a.format_warmup_lr or self.cfg.optimizer.lr)
        return self.grpo_step()

    def train(self) -> dict:
        """Run to ``total_steps``: step, checkpoint, evaluate, log; stop cleanly on a signal.

        A checkpoint that is due is written before that step's evaluation (so the final state
        is on disk before the final evaluation runs), and a single-process run that fails
        saves the last completed step on the way out (``_save_after_failure``).
        """
        cfg = self.cfg
        bar = self._progress_bar()
        last: dict = {}
        before = pending = None  # the state before the running step; a completed step's unwritten metrics
        redirect = nullcontext()
        if bar is not None:  # log lines (samples, warnings) print above the bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm()
        try:
            redirect.__enter__()
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                before = self._state_between_steps()  # what a failure in this step restores
                metrics = self.train_step()
                self.step += 1
                if self.step == self.warmup_steps:  # GRPO starts from the warmed-up model, fresh AdamW moments
                    self.optimizer.state.clear()
                    if self.ref_model is not None or self.cfg.lora.enabled:
                        self.snapshot_reference()
                elif self._reference_sync_due(self.step):
                    self.sync_reference()
                before, pending = None, metrics  # the step is complete: its state is consistent from here on
                metrics["timing/step"] = time.perf_counter() - t0
                metrics["perf/peak_memory_gb"] = peak_memory_gb(self.device)
                metrics["train/phase"] = 0.0 if self.step <= self.warmup_steps and cfg.algorithm.name == "grpo" else 1.0
                signum = int(self._all_reduce(torch.tensor([float(self.signal_received)]), dist.ReduceOp.MAX).item())
                every = cfg.checkpointing.every
                if signum or self.step == self.total_steps or (every and self.step % every == 0):
                    self.save()
                evaluate_now = self.eval_samples and (
                    (cfg.data.eval_every and self.step % cfg.data.eval_every == 0) or self.step == self.total_steps)
                if evaluate_now:
                    for task, acc in self.greedy_accuracy().items():
                        metrics["eval/greedy_accuracy" + (f"/{task}" if task else "")] = acc
                    metrics["eval/skipped_samples"] = float(self.eval_skipped)
                self._log(metrics)
                last = metrics
                self._write_history(metrics)
                pending = None
                if bar is not None:
                    bar.update(1)
                    if self.step == self.warmup_steps < self.total_steps:  # GRPO's steps take longer: its own ETA
                        bar.close()
                        bar = self._progress_bar()
                    shown = ("train/reward", "train/kl", "train/loss", "eval/greedy_accuracy")
                    bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in shown if k in metrics})
                if signum:
                    self.stopped_by_signal = signum
                    logger.warning("stopped by signal %d at step %d; continue with --resume", signum, self.step)
                    break
        except Exception as err:
            # a failed save is not tried again on the way out: it would fail the same way
            self._save_after_failure(before, pending, save=not isinstance(err, SaveError))
            raise
        finally:
            if bar is not None:
                bar.close()
            redirect.__exit__(None, None, None)
            if self.writer is not None:
                self.writer.flush()
        return last

    def _progress_bar(self):
        """rank 0's bar for the current phase (the format warm-up, then GRPO or SFT), or None."""
        if not (self.is_main and self.cfg.logging.progress_bar):
            return None
        from tqdm import tqdm

        if self.step < self.warmup_steps:
            return tqdm(total=self.warmup_steps, initial=self.step, desc="format warm-up", dynamic_ncols=True)
        name = "SFT" if self.cfg.algorithm.name == "sft" else "GRPO"
        return tqdm(total=self.total_steps - self.warmup_steps, initial=self.step - self.warmup_steps, desc=name,
                    dynamic_ncols=True)

    def _write_history(self, metrics: dict) -> None:
        if self.is_main:  # one JSON line per step, written as it happens (survives a crash)
            with (self.run_dir / "history.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _state_between_steps(self) -> dict:
        """What a step changes besides the weights: restored when the step fails before any update."""
        return {"step": self.step, "update": self.update, "applied_updates": self.applied_updates,
                "nonfinite": (self.nonfinite_in_a_row, self.nonfinite_total),
                "stream": self.stream.state_dict(), "rng": rng_state()}

    def _save_after_failure(self, before: dict | None, unlogged: dict | None, save: bool = True) -> None:
        """On an exception: save the last completed step unless it is on disk already.

        ``before`` is None when the failure came after a step completed (evaluation, logging,
        saving): the state is that step's. Otherwise the failed step is undone (data position,
        RNG, counters) when it had not updated the weights yet; when it had, the state is
        neither this step's nor the last one's and nothing is saved. ``unlogged``: the metrics
        of a completed step whose history line was not written yet.
        Only in a single process: with several, the other ranks may be waiting in a collective.
        """
        if self.world > 1:
            logger.error("failure on rank %d; the last checkpoint is step %s", self.rank, self.saved_step)
            return
        if before is not None:
            if self.applied_updates != before["applied_updates"]:
                logger.error("step %d failed after updating the weights: nothing saved; the last checkpoint is "
                             "step %s", before["step"] + 1, self.saved_step)
                return
            self.step, self.update, self.applied_updates = before["step"], before["update"], before["applied_updates"]
            self.nonfinite_in_a_row, self.nonfinite_total = before["nonfinite"]
            self.stream.load_state_dict(before["stream"])
            set_rng_state(before["rng"])
            self.optimizer.zero_grad(set_to_none=True)
        if unlogged is not None:
            self._write_history(unlogged)
        if not save or self.step == 0 or self.saved_step == self.step:
            return
        logger.error("the run failed after step %d: saving that step before stopping", self.step)
        try:
            self.save()
        except Exception as err:  # the original error is the one to report
            logger.error("could not save after the failure (%s: %s); the last checkpoint is step %s",
                         type(err).__name__, err, self.saved_step)

    def _log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        lg = self.cfg.logging
        if self.writer is not None and self.step % lg.log_every == 0:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.step)
        if lg.sample_every and self.step % lg.sample_every == 0 and getattr(self, "_last_texts", None):
            samples, texts = self._last_texts
            G = self.cfg.rollout.group_size
            shown = "\n\n".join(f"**{samples[i // G].question}** (answer: {samples[i // G].answer})\n\n    {texts[i]!r}"
                                for i in range(0, min(len(texts), lg.num_samples * G), G))
            if self.writer is not None:
                self.writer.add_text("samples", shown, self.step)
            logger.info("step %d samples:\n%s", self.step, shown)
        if self.writer is not None:  # on disk now: a run that ends abruptly keeps every curve logged so far
            self.writer.flush()

