"""The supervised step: the SFT baseline, and the label-free format warm-up before GRPO.

The target of a question is ``<answer>{choice}</answer>`` plus the end token: its correct
choice (SFT), or every choice once with the same weight (the label-free warm-up: the format
is learned, the answer is pulled towards uniform over the choices, so accuracy stays at
chance and GRPO's groups start with the most reward variance; one random choice per
question would leave a random bias). The same log-prob entry point, micro-batches and
optimizer step as the GRPO step (grpo/step.py).
"""

from __future__ import annotations

import time

import torch

from data.prompts import answer_target
from grpo.rollout import pad_right, prompt_batch, slice_prompts
from grpo.step import Counters, StepContext, micro_batches, optimizer_step
from models.collectives import all_reduce


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, this micro-batch's share of the token mean.

    L = -(1 / |all target tokens|) * sum_{i,t} log pi(y_it)     logp, mask: [N, T]
    """
    return -(logp * mask).sum() / max(total_tokens, 1)


def sft_targets(tokenizer, answers: list[list[str]], template: int, end_id: int, pad_id: int,
                agree=lambda shape: shape):
    """The SFT step's targets, K per question (K: the most answers of any question), as groups.

    Each target is ``answer_target(answer)`` plus the end token. A question with fewer than K
    answers repeats its first, masked out, so every question is a group of K rows and its
    prompt goes through the decoder once. ``agree`` maps this rank's (K, T) to the one every
    rank uses (the largest of any rank: the row and column counts decide how many lm_head
    chunks, so collectives, a micro-batch runs). Returns ids [B*K, T] (right padded with
    pad_id), mask [B*K, T] (the real targets' tokens) and K.
    """
    targets = [[tokenizer(answer_target(x, template), add_special_tokens=False)["input_ids"] + [end_id] for x in a]
               for a in answers]
    K, T = agree((max(len(a) for a in answers), max(len(r) for a in targets for r in a)))
    rows = [r for a in targets for r in a + a[:1] * (K - len(a))]
    ids = pad_right([torch.tensor([r], dtype=torch.long) for r in rows], pad_id, T)  # [B*K, T]
    lengths = torch.tensor([len(r) if i % K < len(answers[i // K]) else 0 for i, r in enumerate(rows)])  # [B*K]
    mask = torch.arange(ids.shape[1]) < lengths[:, None]  # [B*K, T]
    return ids, mask, K


def sft_step(ctx: StepContext, counters: Counters, label_free: bool, lr: float | None = None
             ) -> tuple[float, float, float]:
    """One supervised step; returns (this rank's loss, the gradient norm, seconds).

      1. take B questions; the targets: the correct choice, or (``label_free``) every choice;
      2. per micro-batch: log pi of the target tokens, each question's K targets as one group
         (its clip encoded once, its prompt through the decoder once), the token-mean NLL's
         share of the whole batch, backward;
      3. clip and the AdamW step (``lr``: the warm-up's rate, which does not move the schedule).
    """
    settings = ctx.settings
    samples, waves = ctx.stream.take(ctx.local_prompts)
    answers = [s.choices if label_free else [s.answer] for s in samples]  # targets of each question
    ids, mask, K = sft_targets(ctx.processor.tokenizer, answers, settings.prompt_template,
                               ctx.sampling.end_token_ids[0], ctx.sampling.pad_token_id,
                               agree=lambda shape: tuple(all_reduce(torch.tensor(shape), ctx.device, "max").tolist())
                               )  # [B*K, T] each, K and T the same on every rank
    ids, mask = ids.to(ctx.device), mask.to(ctx.device)
    prompts = prompt_batch(samples, waves, ctx.processor, settings.prompt_template, ctx.device)
    total_tokens = int(all_reduce(mask.sum().reshape(1).cpu(), ctx.device).item())
    t0 = time.perf_counter()
    loss_total = 0.0
    for lo, hi in micro_batches(len(samples), settings.micro_batch_prompts):
        logp = ctx.logprobs(ctx.model, slice_prompts(prompts, lo, hi), ids[lo * K : hi * K],
                            **ctx.pass_options(temperature=1.0))  # [(hi-lo)*K, T]
        loss = sft_loss(logp, mask[lo * K : hi * K], total_tokens)
        (loss * ctx.world).backward()
        loss_total += loss.item()
    grad_norm = optimizer_step(ctx, counters, loss_total, lr=lr)
    return loss_total, grad_norm, time.perf_counter() - t0
