"""The held-out greedy accuracy the trainer logs while it trains (eval/greedy_accuracy)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from data.datasets import Sample
from grpo.rewards import accuracy_reward
from grpo.rollout import decode_completions, greedy_answers
from grpo.step import StepContext
from models.collectives import all_reduce
from models.distributed import gathered_params


@torch.no_grad()
def greedy_accuracy(ctx: StepContext, samples: list[Sample], load_audio) -> dict[str, float]:
    """Greedy accuracy (the accuracy reward) on held-out questions, over all ranks:
    ``{"": overall, task: accuracy on that task's questions, ...}``.

    Every rank runs the same number of batches (short shards are padded with repeats that do
    not count), so generation stays in lockstep under FSDP. The model is left in train mode.
    """
    if not samples:
        return {"": float("nan")}
    cfg = ctx.cfg
    tasks = sorted({s.task for s in samples if s.task})
    per_rank = math.ceil(len(samples) / ctx.world)
    mine = samples[ctx.rank :: ctx.world]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [samples[0]] * (per_rank - len(mine))
    batch = cfg.rollout.generation_batch_prompts
    correct = torch.zeros(1 + len(tasks), dtype=torch.float64)  # [overall, per task]
    ctx.model.eval()
    with gathered_params(ctx.model) if ctx.fsdp else nullcontext():
        for lo in range(0, per_rank, batch):
            chunk = mine[lo : lo + batch]
            waves = [load_audio(s.audio_path) for s in chunk]
            if cfg.data.silence_audio:
                waves = [np.zeros_like(w) for w in waves]
            ids = greedy_answers(ctx.model, ctx.processor, chunk, waves, ctx.sampling,
                                 template=cfg.data.prompt_template, device=ctx.device,
                                 batch_prompts=batch, sync_ranks=ctx.fsdp)  # [b, T]
            texts = decode_completions(ctx.processor.tokenizer, ids, ctx.sampling.end_token_ids)
            for t, s, w in zip(texts, chunk, weights[lo : lo + batch]):
                hit = w * accuracy_reward(t, s)
                correct[0] += hit
                if s.task in tasks:
                    correct[1 + tasks.index(s.task)] += hit
    ctx.model.train()
    correct = all_reduce(correct, ctx.device).tolist()
    counts = [len(samples)] + [sum(s.task == t for s in samples) for t in tasks]
    return dict(zip([""] + tasks, (c / n for c, n in zip(correct, counts))))
