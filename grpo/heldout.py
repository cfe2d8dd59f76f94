"""The held-out greedy accuracy the trainer logs while it trains (eval/greedy_accuracy)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from data.datasets import Sample
from grpo.rewards import accuracy_reward
from grpo.config import DataConfig
from grpo.rollout import SamplingSettings, decode_completions, greedy_answers
from models.collectives import all_reduce
from models.distributed import DistInfo, gathered_params


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, processor, sampling: SamplingSettings, samples: list[Sample],
                    load_audio, *, data: DataConfig, batch_prompts: int, info: DistInfo,
                    fsdp: bool = False) -> dict[str, float]:
    """Greedy accuracy (the accuracy reward) on held-out questions, over all ranks:
    ``{"": overall, task: accuracy on that task's questions, ...}``. data: the prompt template
    and whether the clips are silenced; batch_prompts: questions per generate call; fsdp: the
    model is sharded (generation gathers it, ranks decode in lockstep).

    Every rank runs the same number of batches (short shards are padded with repeats that do
    not count), so generation stays in lockstep under FSDP. The model is left in train mode.
    """
    if not samples:
        return {"": float("nan")}
    tasks = sorted({s.task for s in samples if s.task})
    per_rank = math.ceil(len(samples) / info.world_size)
    mine = samples[info.rank :: info.world_size]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [samples[0]] * (per_rank - len(mine))
    batch = batch_prompts
    correct = torch.zeros(1 + len(tasks), dtype=torch.float64)  # [overall, per task]
    model.eval()
    with gathered_params(model) if fsdp else nullcontext():
        for lo in range(0, per_rank, batch):
            chunk = mine[lo : lo + batch]
            waves = [load_audio(s.audio_path) for s in chunk]
            if data.silence_audio:
                waves = [np.zeros_like(w) for w in waves]
            ids = greedy_answers(model, processor, chunk, waves, sampling, template=data.prompt_template,
                                 device=info.device, batch_prompts=batch, sync_ranks=fsdp)  # [b, T]
            texts = decode_completions(processor.tokenizer, ids, sampling.end_token_ids)
            for t, s, w in zip(texts, chunk, weights[lo : lo + batch]):
                hit = w * accuracy_reward(t, s)
                correct[0] += hit
                if s.task in tasks:
                    correct[1 + tasks.index(s.task)] += hit
    model.train()
    correct = all_reduce(correct, info.device).tolist()
    counts = [len(samples)] + [sum(s.task == t for s in samples) for t in tasks]
    return dict(zip([""] + tasks, (c / n for c, n in zip(correct, counts))))
