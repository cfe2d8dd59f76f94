"""The run around the GRPO step: set-up, the loop, held-out evaluation, checkpoints, logging.

The step itself is grpo/step.py (one page: sample, score, advantages, log-probs, loss,
backward, optimizer step); the supervised step and the format warm-up are grpo/sft.py;
the logged metrics are computed from what a step returns in grpo/metrics.py; the reference
policy is grpo/reference.py; what carries from step to step (the step number, the counters,
the stream's position) and the signal policy are grpo/runstate.py. ``Trainer`` holds what
lives between steps (the model, the reference, the optimizer, the run state) and runs them:

    set-up     run directory (locked), data, model(s), optimizer, stream, logging, resume
    loop       format warm-up steps, then GRPO (or SFT) steps; after the format warm-up the
               reference is a snapshot of the policy; a reference that follows the policy is synced
    after each step: a checkpoint when due (or on a signal), the held-out greedy accuracy
               when due, the metrics to TensorBoard and history.jsonl
    on failure the last completed step is saved (one process: ``save_after_failure``), then
               the error is raised
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from data.audio import AudioLoader
from data.datasets import Sample
from grpo.checkpoint import SaveError, checkpoint_exports, load_training_state, resolve_resume, save_training_state
from grpo.cli import alike_on_every_rank
from grpo.config import Config, ConfigError, advantage_spec, correction_spec, loss_spec
from grpo.heldout import greedy_accuracy
from grpo.metrics import grpo_metrics, peak_memory_gb, sft_metrics
from grpo.reference import choose_reference
from grpo.rewards import check_reward_names
from grpo.rollout import compile_decoder, sampling_settings
from grpo.runlog import RunLog
from grpo.rundir import prepare_run_dir, record_config, truncate_history
from grpo.runstate import RunState, SignalStop, Snapshot
from grpo.setup import (PromptLimit, load_policy_model, prepare_data, prepare_model, rank_0_first, read_datasets,
                        usable_eval_samples, use_fsdp)
from grpo.sft import sft_step
from grpo.step import Counters, StepContext, StepSettings, grpo_step
from grpo.stream import PromptStream
from models.distributed import DistInfo
from models.loading import load_generation_config, load_processor, resolve_dtype

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the run


class Trainer:
    """A training run: what lives between steps (model, reference, optimizer, run state),
    the loop that runs the steps, checkpoints, evaluation and logging."""

    def __init__(self, cfg: Config, info: DistInfo, *, resume: str | None = None, allow_config_change: bool = False):
        """``resume``: "latest" or a checkpoint path; ``allow_config_change``: resume although keys
        that change the optimisation or the data order differ from the saved config."""
        self.opened = ExitStack()  # the run directory's lock, the curves: closed by close()
        try:
            self._set_up(cfg, info, resume, allow_config_change)
        except BaseException:  # a run that fails to start leaves its directory unlocked
            self.opened.close()
            raise

    def _set_up(self, cfg: Config, info: DistInfo, resume: str | None, allow_config_change: bool) -> None:
        """The run directory (locked, by rank 0), the data, the model(s), the optimizer, the
        stream, logging and signals; then the checkpoint to resume from, if any."""
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.output_dir)
        with alike_on_every_rank():  # the same config on every rank
            check_reward_names(cfg.algorithm.rewards)
            if cfg.rollout.prompts_per_step % info.world_size:
                raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple "
                                  f"of the number of processes ({info.world_size})")
            self.resume_path = resolve_resume(self.run_dir, resume) if resume else None
        rank_0_first(lambda: prepare_run(cfg, self.run_dir, resume, self.resume_path, allow_config_change,
                                         self.opened), is_main=info.is_main, world=info.world_size)
        with alike_on_every_rank():  # every rank reads the same files: set-up errors are the same on each
            self.train_samples, self.eval_samples = read_datasets(cfg)
            self.tasks = sorted({s.task for s in self.train_samples if s.task})  # question types, for metrics
            self._load_models(cfg, info)
            fits = PromptLimit(cfg, self.processor, self.model.config.text_config.max_position_embeddings)
            self.load_audio, self.stream, self.eval_samples, self.eval_skipped = load_questions(
                cfg, info, self.processor, fits, self.train_samples, self.eval_samples)
        self.state = RunState(self.stream)  # step, counters, stream: saved with a checkpoint
        self.stopped_by_signal = 0  # the signal's number, once the run stopped on one
        self.saved_step = None  # the step of the newest checkpoint this run wrote or resumed from
        self.last_samples: tuple[list[Sample], list[str]] | None = None  # the last GRPO batch, for the samples log
        self.log = RunLog(self.run_dir, cfg, info.is_main)
        self.opened.callback(self.log.close)
        self.signals = SignalStop(cfg.checkpointing.save_on_signal)
        if self.resume_path is not None:
            self._resume(self.resume_path)

    def _load_models(self, cfg: Config, info: DistInfo) -> None:
        """The processor, the policy, the reference (with LoRA: the policy with its adapters off,
        no second copy), AdamW; the loss and advantage settings, checked."""
        self.processor = load_processor(cfg.model.path)
        self.generation_config = load_generation_config(cfg.model.path)
        r = cfg.rollout
        self.sampling = sampling_settings(self.processor.tokenizer, self.generation_config,
                                          max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                          top_k=r.top_k, top_p=r.top_p, decoder=r.decoder,
                                          compile_decoder=compile_decoder(r.compile_decoder, self.device))
        self.fsdp = use_fsdp(cfg, info)
        self.loss_spec, self.advantage_spec = loss_spec(cfg), advantage_spec(cfg)
        self.correction_spec = correction_spec(cfg)
        self.step_settings = StepSettings.from_config(cfg)
        if cfg.lora.enabled:  # LoRA's dropout draws from the global RNG: seeded, so a LoRA run repeats exactly
            torch.manual_seed(cfg.run.seed + info.rank)
        grpo = cfg.algorithm.name == "grpo"
        self.format_warmup_steps = cfg.algorithm.format_warmup_steps if grpo else 0
        self.total_steps = self.format_warmup_steps + cfg.run.steps
        self.total_updates = cfg.run.steps * (cfg.algorithm.mu if grpo else 1)
        self.model = load_policy_model(cfg, info.device, fsdp=self.fsdp, trainable=True)
        self.reference = choose_reference(
            cfg, self.model, lambda: load_policy_model(cfg, info.device, fsdp=self.fsdp, trainable=False),
            self.format_warmup_steps)
        o = cfg.optimizer  # AdamW over what is trainable; the learning rate is set per update
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def step(self) -> int:
        """Steps completed, format warm-up included."""
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def counters(self) -> Counters:
        return self.state.counters

    # ----------------------------------------------------------------- the steps

    def context(self) -> StepContext:
        """What a step reads and acts on, from the run's current state."""
        return StepContext(settings=self.step_settings, model=self.model, reference=self.reference,
                           optimizer=self.optimizer, processor=self.processor, sampling=self.sampling,
                           stream=self.stream, device=self.device, total_updates=self.total_updates,
                           loss=self.loss_spec, advantage=self.advantage_spec, correction=self.correction_spec,
                           rank=self.info.rank, world=self.info.world_size, fsdp=self.fsdp)

    def train_step(self) -> dict:
        """One step: the label-free format warm-up, an SFT step, or a GRPO step; its metrics."""
        a = self.cfg.algorithm
        if a.name == "sft":
            return self.sft_step(label_free=False)
        if self.step < self.format_warmup_steps:
            return self.sft_step(label_free=True, lr=a.format_warmup_lr or self.cfg.optimizer.lr)
        return self.grpo_step()

    def grpo_step(self) -> dict:
        """One GRPO step (grpo/step.py) on this rank's questions; its metrics."""
        record = grpo_step(self.context(), self.counters, self.step)
        self.last_samples = (record.trajectory.samples, record.rollout.batch.texts)
        return grpo_metrics(record, self.tasks, self.cfg.rollout.group_size, self.optimizer.param_groups[0]["lr"],
                            self.device)

    def sft_step(self, label_free: bool, lr: float | None = None) -> dict:
        """One supervised step (grpo/sft.py): SFT, or the label-free format warm-up; its metrics."""
        loss, grad_norm, seconds = sft_step(self.context(), self.counters, label_free, lr)
        return sft_metrics(loss, grad_norm, self.optimizer.param_groups[0]["lr"], seconds, self.device)

    def greedy_accuracy(self, samples: list[Sample] | None = None) -> dict[str, float]:
        """Greedy accuracy on the held-out questions (or ``samples``), over all ranks: {"": overall, task: ...}."""
        return greedy_accuracy(self.model, self.processor, self.sampling,
                               self.eval_samples if samples is None else samples, self.load_audio,
                               data=self.cfg.data, batch_prompts=self.cfg.rollout.generation_batch_prompts,
                               info=self.info, fsdp=self.fsdp)

    def _between_steps(self) -> None:
        """After a step: GRPO starts from the warmed-up model (fresh AdamW moments, the
        reference a snapshot of it); a reference that follows the policy is synced when due."""
        if self.step == self.format_warmup_steps:
            self.optimizer.state.clear()
            self.reference.after_format_warmup()
        elif self.reference.sync_due(self.step):
            self.reference.follow(self.optimizer)

    # ----------------------------------------------------------------- checkpoints

    def close(self) -> None:
        """Flush and close the curves, release the run directory (the lock), and drop the model,
        the reference and the optimizer: they hold the process group, which
        ``models.distributed.cleanup`` must tear down before the interpreter exits. The trainer
        is not used afterwards."""
        self.opened.close()
        self.model = self.reference = self.optimizer = None

    def save(self) -> Path:
        """The full training state, and the exports checkpointing.export and LoRA ask for."""
        trainer_state, rank_state = self.state.saved(self.info.world_size)
        path = save_training_state(self.run_dir, self.step, self.model, self.optimizer, trainer_state, rank_state,
                                   rank=self.info.rank, keep_last=self.cfg.checkpointing.keep_last,
                                   keep_exports=self.cfg.checkpointing.keep_exports,
                                   export_fn=checkpoint_exports(self.model, self.processor, self.generation_config,
                                                                self.cfg.lora, export=self.cfg.checkpointing.export,
                                                                is_main=self.info.is_main, dtype=self.export_dtype()),
                                   extra_models=self.reference.saved_models(),
                                   with_frozen=self.reference.base_changed(self.step))
        self.saved_step = self.step
        if self.info.is_main:
            logger.info("checkpoint written: %s", path)
        return path

    def export_dtype(self) -> torch.dtype:
        """The export's dtype: checkpointing.export_dtype, ``model`` being model.dtype on this device."""
        name = self.cfg.checkpointing.export_dtype
        return resolve_dtype(self.cfg.model.dtype if name == "model" else name, self.device)

    def _resume(self, path: Path) -> None:
        self.state.load(*load_training_state(path, self.model, self.optimizer, rank=self.info.rank,
                                             extra_models=self.reference.saved_models(),
                                             with_frozen=self.reference.base_changed,  # at the saved step
                                             verify=False))  # resolve_resume verified it
        self.saved_step = self.step
        if self.info.is_main:
            truncate_history(self.run_dir, self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Run to ``total_steps``: step, checkpoint, evaluate, log; stop cleanly on a signal.

        A checkpoint that is due is written before that step's evaluation (so the final state
        is on disk before the final evaluation runs), and a single-process run that fails
        saves the last completed step on the way out (``save_after_failure``).
        """
        last: dict = {}
        before = pending = None  # the state before the running step; a completed step's unwritten metrics
        with ExitStack() as stack:
            stack.callback(self.log.flush)
            bar = self.log.progress_bar(self.step, self.format_warmup_steps, self.total_steps)
            if bar is not None:  # log lines (samples, warnings) print above the bar, not through it
                from tqdm.contrib.logging import logging_redirect_tqdm

                stack.enter_context(logging_redirect_tqdm())
                stack.callback(lambda: bar.close())  # the bar of the phase the run ends in
            try:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    before = self.state.snapshot()  # what a failure in this step restores
                    metrics = self.train_step()
                    self.step += 1
                    self._between_steps()
                    before, pending = None, metrics  # the step is complete: its state is consistent from here on
                    signum = checkpoint_and_evaluate(self, metrics, time.perf_counter() - t0)
                    self.log.metrics(self.step, metrics, self.last_samples)
                    last = metrics
                    self.log.history(self.step, metrics)
                    pending = None
                    bar = self.log.advance(bar, self.step, self.format_warmup_steps, self.total_steps, metrics)
                    if signum:
                        self.stopped_by_signal = signum
                        logger.warning("stopped by signal %d at step %d; continue with --resume", signum, self.step)
                        break
            except Exception as err:
                # a failed save is not tried again on the way out: it would fail the same way
                save_after_failure(self, before, pending, save=not isinstance(err, SaveError))
                raise
        return last


# --------------------------------------------------------------------------- after each step


def checkpoint_and_evaluate(run: Trainer, metrics: dict, seconds: float) -> int:
    """After step ``run.step``: its timing and memory into ``metrics``, a checkpoint when due
    (or when any rank received a signal), then the held-out evaluation when due. Returns
    the signal's number (0: none)."""
    cfg, step = run.cfg, run.step
    metrics["timing/step"] = seconds
    metrics["perf/peak_memory_gb"] = peak_memory_gb(run.device)
    metrics["train/phase"] = 0.0 if step <= run.format_warmup_steps and cfg.algorithm.name == "grpo" else 1.0
    signum = run.signals.on_any_rank(run.device)
    every = cfg.checkpointing.every
    if signum or step == run.total_steps or (every and step % every == 0):
        run.save()
    evaluate_now = run.eval_samples and (
        (cfg.data.eval_every and step % cfg.data.eval_every == 0) or step == run.total_steps)
    if evaluate_now:
        for task, acc in run.greedy_accuracy().items():
            metrics["eval/greedy_accuracy" + (f"/{task}" if task else "")] = acc
        metrics["eval/skipped_samples"] = float(run.eval_skipped)
    return signum


# --------------------------------------------------------------------------- set-up


def prepare_run(cfg: Config, run_dir: Path, resume: str | None, resume_path: Path | None,
                allow_config_change: bool, opened: ExitStack) -> None:
    """Rank 0: lock the run directory (released when ``opened`` closes), record the config,
    build the model and data if asked to."""
    lock = prepare_run_dir(run_dir, resume=resume is not None, overwrite=cfg.run.overwrite)
    opened.callback(lock.release)
    record_config(run_dir, cfg, resume_path, allow_change=allow_config_change)
    if resume and resume_path is None:  # --resume auto, nothing saved yet
        logger.warning("--resume %s: no checkpoint in %s: starting fresh at step 0", resume, run_dir)
        truncate_history(run_dir, 0)  # what an earlier attempt logged describes no saved state
    prepare_model(cfg)
    prepare_data(cfg)


def load_questions(cfg: Config, info: DistInfo, processor, fits: PromptLimit, train_samples: list[Sample],
                   eval_samples: list[Sample]) -> tuple[AudioLoader, PromptStream, list[Sample], int]:
    """The clip loader, this rank's question stream, and the held-out questions that can be
    used (with how many were skipped): checked now, not at the first evaluation, so a bad
    clip stops the run before step 1."""
    d = cfg.data
    load_audio = AudioLoader(max_seconds=processor.feature_extractor.chunk_length, channel=d.audio_channel)
    stream = PromptStream(train_samples, load_audio, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
                          shuffle=d.shuffle, on_error=d.on_error, keep=fits, silence=d.silence_audio)
    skipped = 0
    if eval_samples:
        eval_samples, skipped = usable_eval_samples(eval_samples, load_audio, fits, cfg)
    return load_audio, stream, eval_samples, skipped


# --------------------------------------------------------------------------- the failure policy


def save_after_failure(run: Trainer, before: Snapshot | None, unlogged: dict | None, save: bool = True) -> None:
    """On an exception in ``run.train()``: save the last completed step unless it is on disk already.

    ``before`` is None when the failure came after a step completed (evaluation, logging,
    saving): the state is that step's. Otherwise the failed step is undone (data position,
    RNG, counters) when it had not updated the weights yet; when it had, the state is
    neither this step's nor the last one's and nothing is saved. ``unlogged``: the metrics
    of a completed step whose history line was not written yet.
    Only in a single process: with several, the other ranks may be waiting in a collective.
    """
    if run.info.world_size > 1:
        logger.error("failure on rank %d; the last checkpoint is step %s", run.info.rank, run.saved_step)
        return
    if before is not None:
        if run.counters.applied_updates != before.counters.applied_updates:
            logger.error("step %d failed after updating the weights: nothing saved; the last checkpoint is "
                         "step %s", before.step + 1, run.saved_step)
            return
        run.state.restore(before)
        run.optimizer.zero_grad(set_to_none=True)
    if unlogged is not None:
        run.log.history(run.step, unlogged)
    if not save or run.step == 0 or run.saved_step == run.step:
        return
    logger.error("the run failed after step %d: saving that step before stopping", run.step)
    try:
        run.save()
    except Exception as err:  # the original error is the one to report
        logger.error("could not save after the failure (%s: %s); the last checkpoint is step %s",
                     type(err).__name__, err, run.saved_step)
