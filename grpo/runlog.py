"""Rank 0's record of a run: TensorBoard scalars and sample completions, history.jsonl, the
progress bar. Every other rank holds a RunLog that writes nothing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger("grpo.trainer")


class RunLog:
    def __init__(self, run_dir: Path, cfg, is_main: bool):
        self.run_dir, self.cfg, self.is_main = Path(run_dir), cfg, is_main
        self.writer = None
        if is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))

    def metrics(self, step: int, metrics: dict, samples=None) -> None:
        """The step's scalars (every logging.log_every steps) and, every logging.sample_every
        steps, a few of its completions (``samples``: (questions [B], texts [B*G]) or None),
        flushed to disk: a run that ends abruptly keeps every curve logged so far."""
        if not self.is_main:
            return
        lg = self.cfg.logging
        if self.writer is not None and step % lg.log_every == 0:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if lg.sample_every and step % lg.sample_every == 0 and samples is not None:
            questions, texts = samples
            G = self.cfg.rollout.group_size
            shown = "\n\n".join(f"**{questions[i // G].question}** (answer: {questions[i // G].answer})\n\n"
                                f"    {texts[i]!r}" for i in range(0, min(len(texts), lg.num_samples * G), G))
            if self.writer is not None:
                self.writer.add_text("samples", shown, step)
            logger.info("step %d samples:\n%s", step, shown)
        if self.writer is not None:
            self.writer.flush()

    def history(self, step: int, metrics: dict) -> None:
        """One JSON line per step in history.jsonl, written as it happens (it survives a crash)."""
        if self.is_main:
            # O_NOFOLLOW: a link put in its place (say, to another run's history) is an error, not appended to
            fd = os.open(self.run_dir / "history.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def progress_bar(self, step: int, format_warmup_steps: int, total_steps: int):
        """Rank 0's bar for the current phase (the format warm-up, then GRPO or SFT), or None."""
        if not (self.is_main and self.cfg.logging.progress_bar):
            return None
        from tqdm import tqdm

        if step < format_warmup_steps:
            return tqdm(total=format_warmup_steps, initial=step, desc="format warm-up", dynamic_ncols=True)
        name = "SFT" if self.cfg.algorithm.name == "sft" else "GRPO"
        return tqdm(total=total_steps - format_warmup_steps, initial=step - format_warmup_steps, desc=name,
                    dynamic_ncols=True)

    def advance(self, bar, step: int, format_warmup_steps: int, total_steps: int, metrics: dict):
        """The bar one step on, showing the main metrics; a new bar when GRPO starts."""
        if bar is None:
            return None
        bar.update(1)
        if step == format_warmup_steps < total_steps:  # GRPO's steps take longer: its own ETA
            bar.close()
            bar = self.progress_bar(step, format_warmup_steps, total_steps)
        shown = ("train/reward", "train/kl", "train/loss", "eval/greedy_accuracy")
        bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in shown if k in metrics})
        return bar

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
