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
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from data.audio import AudioLoader
from data.datasets import Sample
from grpo import step as grpo
from grpo.checkpoint import (ResumeError, SaveError, checkpoint_exports, load_training_state, resolve_resume,
                             rng_state, save_training_state, set_rng_state)
from grpo.cli import alike_on_every_rank, same_on_every_rank
from grpo.config import Config, ConfigError
from grpo.heldout import greedy_accuracy
from grpo.metrics import grpo_metrics, peak_memory_gb, sft_metrics
from grpo.rewards import check_reward_names
from grpo.rollout import sampling_settings
from grpo.runlog import RunLog
from grpo.rundir import prepare_run_dir, record_config, truncate_history
from grpo.setup import (PromptLimit, check_inputs, load_policy_model, prepare_data, prepare_model,  # noqa: F401
                        rank_0_first, read_datasets, usable_eval_samples, use_fsdp)
from grpo.step import Counters, StepContext, lr_at  # noqa: F401  (re-exported: train.py, benchmarks, tests)
from grpo.stream import PromptStream
from grpo.warmup import sft_step
from models.collectives import all_reduce
from models.distributed import DistInfo
from models.loading import load_generation_config, load_processor, resolve_dtype

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- set-up


# --------------------------------------------------------------------------- what the schedule decides


def reference_sync_due(cfg: Config, warmup_steps: int, step: int) -> bool:
    """Whether the reference follows the policy after ``step`` (every ref_sync_every GRPO steps)."""
    every, grpo_steps = cfg.algorithm.ref_sync_every, step - warmup_steps
    has_reference = cfg.algorithm.beta > 0 or cfg.lora.enabled
    return cfg.algorithm.name == "grpo" and every > 0 and grpo_steps > 0 and grpo_steps % every == 0 and has_reference


def base_changed(cfg: Config, warmup_steps: int, step: int) -> bool:
    """Whether the weights besides the trainable ones differ from model.path at ``step``, so a
    checkpoint must hold them: always without LoRA (everything trains); with LoRA, once the
    format warm-up's adapters (or, with a reference that follows the policy, GRPO's) were
    merged into the base."""
    every = cfg.algorithm.ref_sync_every
    return not cfg.lora.enabled or 0 < warmup_steps <= step or (every > 0 and warmup_steps + every <= step)


# --------------------------------------------------------------------------- the run


class Trainer:
    """A training run: what lives between steps (model, reference, optimizer, stream,
    counters), the loop that runs the steps, checkpoints, evaluation and logging."""

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
        """The run directory (locked, by rank 0), the data, the model(s), the optimizer, the
        stream, logging and signals; then the checkpoint to resume from, if any."""
        self.cfg, self.info, self.device = cfg, info, info.device
        self.rank, self.world, self.is_main = info.rank, info.world_size, info.rank == 0
        self.run_dir = Path(cfg.run.output_dir)
        with alike_on_every_rank():  # the same config on every rank
            check_reward_names(cfg.algorithm.rewards)
            if cfg.rollout.prompts_per_step % self.world:
                raise ConfigError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple "
                                  f"of the number of processes ({self.world})")
            self.resume_path = resolve_resume(self.run_dir, resume) if resume else None
        rank_0_first(lambda: self._prepare_run(resume, allow_config_change), is_main=self.is_main, world=self.world)
        with alike_on_every_rank():  # every rank reads the same files: set-up errors are the same on each
            self.train_samples, self.eval_samples = read_datasets(cfg)
            self.tasks = sorted({s.task for s in self.train_samples if s.task})  # question types, for metrics
            self._load_models(cfg, info)
        self.step, self.counters = 0, Counters()  # the counters are saved with a checkpoint
        self.stop_requested, self.signal_received, self.stopped_by_signal = False, 0, 0  # a signal's number
        self.saved_step = None  # the step of the newest checkpoint this run wrote or resumed from
        self.last_samples: tuple[list[Sample], list[str]] | None = None  # the last GRPO batch, for the samples log
        self.log = RunLog(self.run_dir, cfg, self.is_main)
        if cfg.checkpointing.save_on_signal:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        if self.resume_path is not None:
            self._resume(self.resume_path)

    def _prepare_run(self, resume: str | None, allow_config_change: bool) -> None:
        """Rank 0: lock the run directory, record the config, build the model and data if asked to."""
        cfg = self.cfg
        self.run_lock = prepare_run_dir(self.run_dir, resume=resume is not None, overwrite=cfg.run.overwrite)
        record_config(self.run_dir, cfg, self.resume_path, allow_change=allow_config_change)
        if resume and self.resume_path is None:  # --resume auto, nothing saved yet
            logger.warning("--resume %s: no checkpoint in %s: starting fresh at step 0", resume, self.run_dir)
            truncate_history(self.run_dir, 0)  # what an earlier attempt logged describes no saved state
        prepare_model(cfg)
        prepare_data(cfg)

    def _load_models(self, cfg: Config, info: DistInfo) -> None:
        """The processor, the policy, the reference (with LoRA: the policy with its adapters off,
        no second copy), AdamW, this rank's stream; the held-out questions checked."""
        self.processor = load_processor(cfg.model.path)
        self.generation_config = load_generation_config(cfg.model.path)
        r = cfg.rollout
        self.sampling = sampling_settings(self.processor.tokenizer, self.generation_config,
                                          max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                          top_k=r.top_k, top_p=r.top_p)
        self.fsdp = use_fsdp(cfg, info)
        if cfg.lora.enabled:  # LoRA's dropout draws from the global RNG: seeded, so a LoRA run repeats exactly
            torch.manual_seed(cfg.run.seed + self.rank)
        self.model = load_policy_model(cfg, self.device, fsdp=self.fsdp, trainable=True)
        self.ref_model = None
        if cfg.algorithm.name == "grpo" and cfg.algorithm.beta > 0 and not cfg.lora.enabled:
            self.ref_model = load_policy_model(cfg, self.device, fsdp=self.fsdp, trainable=False)
        fits = PromptLimit(cfg, self.processor, self.model.config.text_config.max_position_embeddings)
        o = cfg.optimizer  # AdamW over what is trainable; the learning rate is set per update
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)
        self.warmup_steps = cfg.algorithm.format_warmup_steps if cfg.algorithm.name == "grpo" else 0
        self.total_steps = self.warmup_steps + cfg.run.steps
        self.total_updates = cfg.run.steps * (cfg.algorithm.mu if cfg.algorithm.name == "grpo" else 1)
        d = cfg.data
        self.load_audio = AudioLoader(max_seconds=self.processor.feature_extractor.chunk_length,
                                      channel=d.audio_channel)
        self.stream = PromptStream(self.train_samples, self.load_audio, seed=cfg.run.seed, rank=self.rank,
                                   world_size=self.world, shuffle=d.shuffle, on_error=d.on_error, keep=fits,
                                   silence=d.silence_audio)
        self.eval_skipped = 0
        if self.eval_samples:  # now, not at the first evaluation: a bad clip stops the run before step 1
            self.eval_samples, self.eval_skipped = usable_eval_samples(self.eval_samples, self.load_audio, fits, cfg)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        logger.warning("signal %d: saving a checkpoint after this step, then stopping", signum)
        self.stop_requested = True
        self.signal_received = signum

    # ----------------------------------------------------------------- the steps

    def context(self) -> StepContext:
        """What a step reads and acts on, from the run's current state."""
        return StepContext(cfg=self.cfg, model=self.model, reference=self.ref_model, optimizer=self.optimizer,
                           processor=self.processor, sampling=self.sampling, stream=self.stream, device=self.device,
                           total_updates=self.total_updates, rank=self.rank, world=self.world, fsdp=self.fsdp)

    def train_step(self) -> dict:
        """One step: the label-free format warm-up, an SFT step, or a GRPO step; its metrics."""
        a = self.cfg.algorithm
        if a.name == "sft":
            return self.sft_step(label_free=False)
        if self.step < self.warmup_steps:
            return self.sft_step(label_free=True, lr=a.format_warmup_lr or self.cfg.optimizer.lr)
        return self.grpo_step()

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

    def greedy_accuracy(self, samples: list[Sample] | None = None) -> dict[str, float]:
        """Greedy accuracy on the held-out questions (or ``samples``), over all ranks: {"": overall, task: ...}."""
        return greedy_accuracy(self.context(), self.eval_samples if samples is None else samples, self.load_audio)

    def _between_steps(self) -> None:
        """After a step: GRPO starts from the warmed-up model (fresh AdamW moments, the
        reference a snapshot of it); a reference that follows the policy is synced when due."""
        if self.step == self.warmup_steps:
            self.optimizer.state.clear()
            if self.ref_model is not None or self.cfg.lora.enabled:
                grpo.snapshot_reference(self.context())
        elif reference_sync_due(self.cfg, self.warmup_steps, self.step):
            grpo.sync_reference(self.context())

    # ----------------------------------------------------------------- checkpoints

    def close(self) -> None:
        """Flush and close the curves, release the run directory (the lock), and drop the model,
        the reference and the optimizer: they hold the process group, which
        ``models.distributed.cleanup`` must tear down before the interpreter exits. The trainer
        is not used afterwards."""
        self.log.close()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None
        self.model = self.ref_model = self.optimizer = None

    def save(self) -> Path:
        """The full training state, and the exports checkpointing.export and LoRA ask for."""
        trainer_state = {"update": self.counters.update, "nonfinite_total": self.counters.nonfinite_total,
                         "world_size": self.world}
        path = save_training_state(self.run_dir, self.step, self.model, self.optimizer, trainer_state,
                                   {"stream": self.stream.state_dict()}, rank=self.rank,
                                   keep_last=self.cfg.checkpointing.keep_last,
                                   keep_exports=self.cfg.checkpointing.keep_exports,
                                   export_fn=checkpoint_exports(self.model, self.processor, self.generation_config,
                                                                self.cfg.lora, export=self.cfg.checkpointing.export,
                                                                is_main=self.is_main, dtype=self.export_dtype()),
                                   extra_models=self._saved_models(),
                                   with_frozen=base_changed(self.cfg, self.warmup_steps, self.step))
        self.saved_step = self.step
        if self.is_main:
            logger.info("checkpoint written: %s", path)
        return path

    def export_dtype(self) -> torch.dtype:
        """The export's dtype: checkpointing.export_dtype, ``model`` being model.dtype on this device."""
        name = self.cfg.checkpointing.export_dtype
        return resolve_dtype(self.cfg.model.dtype if name == "model" else name, self.device)

    def _saved_models(self) -> dict:
        # After a format warm-up the reference is a snapshot of the policy, not the checkpoint
        # on disk, so it must be saved with the run to be restored; so is one that follows the policy.
        moved = self.warmup_steps or self.cfg.algorithm.ref_sync_every
        return {"reference": self.ref_model} if self.ref_model is not None and moved else {}

    def _resume(self, path: Path) -> None:
        saved_step = json.loads((path / "trainer_state.json").read_text())["step"]
        trainer_state, rank_state = load_training_state(path, self.model, self.optimizer, rank=self.rank,
                                                        extra_models=self._saved_models(),
                                                        with_frozen=base_changed(self.cfg, self.warmup_steps,
                                                                                 saved_step),
                                                        verify=False)  # resolve_resume verified it
        if trainer_state.get("world_size", self.world) != self.world:
            raise same_on_every_rank(ResumeError(f"{path} was saved by {trainer_state['world_size']} processes; "
                                                 f"resume it with the same number (now {self.world})"))
        self.step, self.counters.update = trainer_state["step"], trainer_state["update"]
        self.saved_step = self.step
        self.counters.nonfinite_total = trainer_state.get("nonfinite_total", 0)
        self.stream.load_state_dict(rank_state["stream"])
        if self.is_main:
            truncate_history(self.run_dir, self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------- the loop

    def train(self) -> dict:
        """Run to ``total_steps``: step, checkpoint, evaluate, log; stop cleanly on a signal.

        A checkpoint that is due is written before that step's evaluation (so the final state
        is on disk before the final evaluation runs), and a single-process run that fails
        saves the last completed step on the way out (``_save_after_failure``).
        """
        bar = self.log.progress_bar(self.step, self.warmup_steps, self.total_steps)
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
                self._between_steps()
                before, pending = None, metrics  # the step is complete: its state is consistent from here on
                signum = self._checkpoint_and_evaluate(metrics, time.perf_counter() - t0)
                self.log.metrics(self.step, metrics, self.last_samples)
                last = metrics
                self.log.history(self.step, metrics)
                pending = None
                bar = self.log.advance(bar, self.step, self.warmup_steps, self.total_steps, metrics)
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
            self.log.flush()
        return last

    def _checkpoint_and_evaluate(self, metrics: dict, seconds: float) -> int:
        """After step ``self.step``: its timing and memory into ``metrics``, a checkpoint when due
        (or when any rank received a signal), then the held-out evaluation when due. Returns
        the signal's number (0: none)."""
        cfg = self.cfg
        metrics["timing/step"] = seconds
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
        return signum

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
            self.log.history(self.step, unlogged)
        if not save or self.step == 0 or self.saved_step == self.step:
            return
        logger.error("the run failed after step %d: saving that step before stopping", self.step)
        try:
            self.save()
        except Exception as err:  # the original error is the one to report
            logger.error("could not save after the failure (%s: %s); the last checkpoint is step %s",
                         type(err).__name__, err, self.saved_step)
