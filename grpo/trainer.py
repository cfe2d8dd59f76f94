"""The run around the GRPO step: set-up, the loop, held-out evaluation, checkpoints, signals, logging.

The step itself is grpo/step.py (one page: sample, score, advantages, log-probs, loss,
backward, optimizer step); the supervised step and the format warm-up are grpo/warmup.py;
the logged metrics are computed from what a step returns in grpo/metrics.py. ``Trainer``
holds what lives between steps (the model, the reference, the optimizer, the data stream,
the counters) and runs them:

    set-up     run directory (locked), data, model(s), optimizer, stream, logging, resume
    loop       warm-up steps, then GRPO (or SFT) steps; after the warm-up the reference is
               a snapshot of the policy; a reference that follows the policy is synced
    after each step: a checkpoint when due (or on a signal), the held-out greedy accuracy
               when due, the metrics to TensorBoard and history.jsonl
    on failure the last completed step is saved (one process), then the error is raised
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from data.audio import AudioError, AudioLoader
from data.collate import prompt_length
from data.datasets import DataError, Sample, read_dataset
from grpo import step as grpo
from grpo.checkpoint import (ResumeError, SaveError, load_checkpoint, resolve_resume, rng_state, save_checkpoint,
                             set_rng_state)
from grpo.config import Config, ConfigError
from grpo.metrics import grpo_metrics, peak_memory_gb, sft_metrics
from grpo.rewards import accuracy_reward, check_reward_names
from grpo.rollout import decode_completions, greedy_answers, sampling_settings
from grpo.cli import alike_on_every_rank, same_on_every_rank, user_errors
from grpo.rundir import check_run_dir, prepare_run_dir, record_config
from grpo.step import Counters, StepContext, lr_at  # noqa: F401  (lr_at: the schedule, used by tests)
from grpo.stream import PromptStream
from grpo.warmup import sft_step
from models.collectives import all_reduce, broadcast_object
from models.distributed import DistInfo, export_checkpoint, full_state_dict, gathered_params, shard_model
from models.loading import (CheckpointError, enable_activation_checkpointing, load_generation_config, load_model,
                            load_processor, resolve_dtype)
from models.lora import apply_lora, merged_state_dict, save_adapters
from models.policy import set_trainable

logger = logging.getLogger(__name__)


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
    """Build the tiny Qwen2-Audio at model.path when asked to and absent (rank 0 only)."""
    m = cfg.model
    if not m.build_tiny or (Path(m.path) / "config.json").is_file():
        return
    from data.synthetic import synthetic_corpus
    from models.tiny import build_tiny_checkpoint

    logger.info("building the tiny Qwen2-Audio at %s", m.path)
    build_tiny_checkpoint(m.path, seed=m.tiny_seed, corpus=synthetic_corpus(),
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
            verdict = broadcast_object(None if failure is None else (type(failure), str(failure)))
            if verdict is not None and failure is None:
                kind, message = verdict
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
        self.step = 0
        self.counters = Counters()  # updates, non-finite updates: saved with a checkpoint
        self.stop_requested = False
        self.signal_received = 0  # the number of the signal that asked to stop
        self.stopped_by_signal = 0  # set when the run stopped (after saving) because of it
        self.saved_step = None  # the step of the newest checkpoint this run wrote or resumed from
        self.last_samples: tuple[list[Sample], list[str]] | None = None  # the last GRPO batch, for the samples log
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
        with gathered_params(self.model) if self.fsdp else nullcontext():
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
        correct = all_reduce(correct, self.device).tolist()
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
            "update": self.counters.update,
            "nonfinite_total": self.counters.nonfinite_total,
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
    def _resume(self, path: Path) -> None:
        saved_step = json.loads((path / "trainer_state.json").read_text())["step"]
        trainer_state, rank_state = load_checkpoint(path, self.model, self.optimizer, rank=self.rank,
                                                    extra_models=self._saved_models(),
                                                    frozen=self._base_changed(saved_step),
                                                    verify=False)  # resolve_resume verified it
        if trainer_state.get("world_size", self.world) != self.world:
            raise same_on_every_rank(ResumeError(f"{path} was saved by {trainer_state['world_size']} processes; "
                             f"resume it with the same number (now {self.world})"))
        self.step, self.counters.update = trainer_state["step"], trainer_state["update"]
        self.saved_step = self.step
        self.counters.nonfinite_total = trainer_state.get("nonfinite_total", 0)
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

    def context(self) -> StepContext:
        """What a step reads and acts on, from the run's current state."""
        return StepContext(cfg=self.cfg, model=self.model, reference=self.ref_model, optimizer=self.optimizer,
                           processor=self.processor, sampling=self.sampling, stream=self.stream, device=self.device,
                           total_updates=self.total_updates, rank=self.rank, world=self.world, fsdp=self.fsdp)

    def grpo_step(self) -> dict:
        """One GRPO step (grpo/step.py) on this rank's questions; its metrics."""
        record = grpo.grpo_step(self.context(), self.counters, self.step)
        self.last_samples = (record.trajectory.samples, record.rollout.batch.texts)
        return grpo_metrics(record, self.tasks, self.cfg.rollout.group_size, self.optimizer.param_groups[0]["lr"],
                            self.device)

    def sft_step(self, label_free: bool, lr: float | None = None) -> dict:
        """One supervised step (grpo/warmup.py): SFT, or the label-free format warm-up; its metrics."""
        loss, grad_norm, seconds = sft_step(self.context(), self.counters, label_free, lr)
        return sft_metrics(loss, grad_norm, self.optimizer.param_groups[0]["lr"], seconds, self.device)

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
                        grpo.snapshot_reference(self.context())
                elif self._reference_sync_due(self.step):
                    grpo.sync_reference(self.context())
                before, pending = None, metrics  # the step is complete: its state is consistent from here on
                metrics["timing/step"] = time.perf_counter() - t0
                metrics["perf/peak_memory_gb"] = peak_memory_gb(self.device)
                metrics["train/phase"] = 0.0 if self.step <= self.warmup_steps and cfg.algorithm.name == "grpo" else 1.0
                signum = int(all_reduce(torch.tensor([float(self.signal_received)]), self.device, "max").item())
                every = cfg.checkpointing.every
                if signum or self.step == self.total_steps or (every and self.step % every == 0):
                    self.save()
                evaluate_now = self.eval_samples and (
                    (cfg.data.eval_every and self.step % cfg.data.eval_every == 0) or self.step == self.total_steps)
                if evaluate_now:
                    for task, acc in self.greedy_accuracy().items():
                        metrics["eval/greedy_accuracy" + (f"/{task}" if task else "")] = acc
                    metrics["eval/skipped_samples"] = float(self.eval_skipped)
                self.log_metrics(metrics)
                last = metrics
                self.write_history(metrics)
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

    def write_history(self, metrics: dict) -> None:
        if self.is_main:  # one JSON line per step, written as it happens (survives a crash)
            with (self.run_dir / "history.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _state_between_steps(self) -> dict:
        """What a step changes besides the weights: restored when the step fails before any update."""
        c = self.counters
        return {"step": self.step, "update": c.update, "applied_updates": c.applied_updates,
                "nonfinite": (c.nonfinite_in_a_row, c.nonfinite_total),
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
            c = self.counters
            if c.applied_updates != before["applied_updates"]:
                logger.error("step %d failed after updating the weights: nothing saved; the last checkpoint is "
                             "step %s", before["step"] + 1, self.saved_step)
                return
            self.step, c.update, c.applied_updates = before["step"], before["update"], before["applied_updates"]
            c.nonfinite_in_a_row, c.nonfinite_total = before["nonfinite"]
            self.stream.load_state_dict(before["stream"])
            set_rng_state(before["rng"])
            self.optimizer.zero_grad(set_to_none=True)
        if unlogged is not None:
            self.write_history(unlogged)
        if not save or self.step == 0 or self.saved_step == self.step:
            return
        logger.error("the run failed after step %d: saving that step before stopping", self.step)
        try:
            self.save()
        except Exception as err:  # the original error is the one to report
            logger.error("could not save after the failure (%s: %s); the last checkpoint is step %s",
                         type(err).__name__, err, self.saved_step)

    def log_metrics(self, metrics: dict) -> None:
        if not self.is_main:
            return
        lg = self.cfg.logging
        if self.writer is not None and self.step % lg.log_every == 0:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.step)
        if lg.sample_every and self.step % lg.sample_every == 0 and self.last_samples is not None:
            samples, texts = self.last_samples
            G = self.cfg.rollout.group_size
            shown = "\n\n".join(f"**{samples[i // G].question}** (answer: {samples[i // G].answer})\n\n    {texts[i]!r}"
                                for i in range(0, min(len(texts), lg.num_samples * G), G))
            if self.writer is not None:
                self.writer.add_text("samples", shown, self.step)
            logger.info("step %d samples:\n%s", self.step, shown)
        if self.writer is not None:  # on disk now: a run that ends abruptly keeps every curve logged so far
            self.writer.flush()

