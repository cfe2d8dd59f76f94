"""One GRPO step, on one page: read ``grpo_step``, then ``rollout`` and ``policy_update`` below it.

    1. sample    B questions from the stream, G completions each from the policy   [B*G, T]
    2. score     every completion against its question: rewards                   [B, G]
    3. (dynamic sampling) more rounds until every rank holds B groups whose rewards differ
    4. advantages, normalised within each group over the global batch, and the loss mask
    5. log pi_old (only when mu > 1) and log pi_ref (only when beta > 0), without gradients
    6. per micro-batch: log pi_theta, ``policy_loss``, ``backward``           (mu passes)
    7. after each pass: clip the gradient norm, the AdamW step

Every rank holds B / world_size prompts with all G of their completions, so each group
lives on one rank. Gradients are averaged across ranks by FSDP; the loss of each
micro-batch is its share of the *global* batch loss, times world_size, so that the
averaged gradient is the gradient of the whole batch. The equations are in
grpo/algorithm.py; the metrics are computed from what the step returns in grpo/metrics.py.

Shapes: B questions on this rank, G completions each, N = B*G rows, T completion tokens,
W ranks. Every log-prob goes through one function, ``models.policy.policy_logprobs``
(each clip through the encoder once, each prompt through the decoder once per group);
the benchmark gives the step other pieces (``StepContext.rounds_from``, ``StepContext.logprobs``)
to time the naive way of calling the model through this same code.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from data.datasets import Sample
from grpo.algorithm import (AdvantageSpec, CorrectionSpec, LossSpec, completion_mask, entropy_threshold,
                            high_entropy_mask, multi_reward_advantages, policy_loss, rollout_correction)
from grpo.reference import NoReference
from grpo.rewards import compute_rewards, soft_overlong_punishment
from grpo.rollout import (completion_seeds, decode_completions, pad_right, prompt_batch, sample_completions,
                          select_prompts, slice_prompts)
from models.collectives import all_gather, all_reduce
from models.distributed import gathered_params
from models.policy import policy_logprobs

if TYPE_CHECKING:  # the types of StepContext's fields
    from transformers import ProcessorMixin

    from grpo.config import Config, OptimizerConfig
    from grpo.rollout import SamplingSettings
    from grpo.stream import PromptStream

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """The configuration keys a step reads beyond the loss, advantage and correction specs,
    resolved once at set-up (``from_config``) so that the step does not carry the whole ``Config``."""

    group_size: int  # G: completions per prompt
    prompts_per_step: int  # B over all ranks
    temperature: float  # sampling temperature; the log-prob passes use the same
    max_new_tokens: int  # completion length limit (the overlong reward's end)
    generation_batch_prompts: int  # prompts generated together on a rank
    prompt_template: int  # the R1-AQA prompt
    seed: int  # the run's seed: the completions' sampling seeds
    dynamic_sampling: bool  # resample until every group's rewards differ
    max_sampling_rounds: int
    mask_truncated: bool  # leave completions cut at max_new_tokens out of the loss
    rewards: dict[str, float]  # reward name -> weight
    overlong_buffer: int  # the soft overlong punishment's buffer (0: off)
    overlong_penalty: float  # its weight
    micro_batch_prompts: int  # prompts (with their G completions) per forward/backward
    mu: int  # optimizer updates per rollout
    top_entropy_fraction: float  # train on this fraction of highest-entropy loss tokens
    shared_prefix: bool  # log-prob passes: each prompt through the decoder once per group
    audio_real_frames: bool  # the encoder over the clips' real frames only
    logprob_chunk_rows: int  # rows per lm_head + log_softmax chunk
    optimizer: OptimizerConfig  # a copy: the gradient clip, the non-finite limit, the learning-rate schedule

    @classmethod
    def from_config(cls, cfg: Config) -> StepSettings:
        r, a, m = cfg.rollout, cfg.algorithm, cfg.model
        return cls(group_size=r.group_size, prompts_per_step=r.prompts_per_step, temperature=r.temperature,
                   max_new_tokens=r.max_new_tokens, generation_batch_prompts=r.generation_batch_prompts,
                   prompt_template=cfg.data.prompt_template, seed=cfg.run.seed,
                   dynamic_sampling=a.dynamic_sampling, max_sampling_rounds=a.max_sampling_rounds,
                   mask_truncated=a.mask_truncated, rewards=dict(a.rewards), overlong_buffer=a.overlong_buffer,
                   overlong_penalty=a.overlong_penalty, micro_batch_prompts=a.micro_batch_prompts, mu=a.mu,
                   top_entropy_fraction=a.top_entropy_fraction, shared_prefix=m.shared_prefix,
                   audio_real_frames=m.audio_real_frames, logprob_chunk_rows=m.logprob_chunk_rows,
                   optimizer=replace(cfg.optimizer))


@dataclass
class StepContext:
    """What one step reads and acts on. The trainer builds one per step; tests and the
    benchmark build their own. ``logprobs`` and ``rounds_from`` are the pieces the benchmark
    swaps (a naive log-prob pass; its fixed prompts sampled the naive way) so that it times
    this same code: two fields with the production pieces as defaults are a smaller seam than
    patching the module's globals; everything else is the run's state."""

    settings: StepSettings  # the configuration keys the step reads (StepSettings.from_config)
    model: torch.nn.Module  # the policy pi_theta
    reference: NoReference  # pi_ref (grpo.reference: none, a frozen copy, or the policy with its adapters off)
    optimizer: torch.optim.Optimizer
    processor: ProcessorMixin  # the checkpoint's processor (tokenizer + feature extractor)
    sampling: SamplingSettings
    stream: PromptStream | None  # this rank's questions (None: the benchmark's rounds_from supplies them)
    device: torch.device
    total_updates: int  # optimizer updates of the whole run (the learning-rate schedule's length)
    loss: LossSpec  # the loss (grpo.config.loss_spec: resolved once at set-up)
    advantage: AdvantageSpec  # rewards -> advantages (grpo.config.advantage_spec)
    correction: CorrectionSpec  # the sampler/trainer gap's correction (grpo.config.correction_spec)
    rank: int = 0
    world: int = 1
    fsdp: bool = False  # the model is sharded: generation gathers it, ranks decode in lockstep
    logprobs: Callable = policy_logprobs  # (model, prompts, ids, **kw) -> log pi [N, T] (, entropy [N, T])
    rounds_from: Callable | None = None  # (ctx, step, round) -> Round; None: ``sample_round``, the stream's questions

    @property
    def local_prompts(self) -> int:
        return self.settings.prompts_per_step // self.world

    def pass_options(self, temperature: float | None = None) -> dict:
        """The log-prob pass's settings: the sampling temperature, the two exact savings and the
        lm_head chunk (rows per chunk: with the agreed widths, the same chunk count on every rank)."""
        s = self.settings
        return dict(temperature=s.temperature if temperature is None else temperature,
                    shared_prefix=s.shared_prefix, real_frames=s.audio_real_frames, chunk_size=s.logprob_chunk_rows)


@dataclass
class Counters:
    """What the optimizer steps count across steps (saved with a checkpoint, restored after a failure)."""

    update: int = 0  # GRPO/SFT updates taken: the learning-rate schedule's position
    applied_updates: int = 0  # optimizer steps taken, warm-up included: did a failed step change the weights?
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0


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


class RolloutRecord(NamedTuple):
    """What the rollout saw, for the metrics (grpo.metrics.rollout_metrics)."""

    rounds: list[Round]  # every round sampled (the first: before dynamic sampling)
    batch: Round  # the B groups kept
    all_rewards: torch.Tensor  # [W*N] every rank's total rewards
    lengths: torch.Tensor  # [N] completion tokens, end token included
    ended: torch.Tensor  # [N] bool, the completion produced an end token
    seconds: dict[str, float]  # rollout, old_logp, reference


class UpdateRecord(NamedTuple):
    """What the update saw, for the metrics (grpo.metrics.update_metrics)."""

    sums: dict[str, float]  # this rank's loss statistics summed over loss tokens, and "entropy", "tokens"
    losses: list[float]  # [mu] this rank's loss of each pass
    norms: list[float]  # [mu] the global gradient norm of each pass
    trained_tokens: int  # tokens through the model with gradients, this rank (prompt rows x G + loss tokens)
    gap: torch.Tensor  # [3] |sampler log-prob - log pi_old| over the loss tokens: sum, max, count
    seconds: float


class StepRecord(NamedTuple):
    trajectory: Trajectory
    rollout: RolloutRecord
    update: UpdateRecord


# --------------------------------------------------------------------------- the step


def grpo_step(ctx: StepContext, counters: Counters, step: int) -> StepRecord:
    """One GRPO step on this rank's B questions: stages 1-5 without gradients, then 6-7."""
    traj, seen = rollout(ctx, step)
    return StepRecord(traj, seen, policy_update(ctx, counters, traj))


@torch.no_grad()
def rollout(ctx: StepContext, step: int) -> tuple[Trajectory, RolloutRecord]:
    """Stages 1-5: the completions, their advantages, and the log-probs the loss compares against."""
    a, G = ctx.settings, ctx.settings.group_size
    ctx.model.eval()
    t0 = time.perf_counter()

    # 1-2. sample G completions per question and score them
    draw = ctx.rounds_from or sample_round
    rounds = [draw(ctx, step, 0)]
    # 3. dynamic sampling (DAPO): the condition is a collective, so every rank runs the same rounds
    while a.dynamic_sampling and len(rounds) <= a.max_sampling_rounds and short_of_signal(ctx, rounds):
        rounds.append(draw(ctx, step, len(rounds)))
    batch = select_groups(rounds, ctx.local_prompts, G, ctx.processor.tokenizer.pad_token_id,
                          ctx.sampling.pad_token_id) if a.dynamic_sampling else rounds[0]
    width = int(all_reduce(torch.tensor([batch.ids.shape[1]]), ctx.device, "max"))  # one T on every rank
    ids = pad_right([batch.ids], ctx.sampling.pad_token_id, width)  # [N, T]
    sampler_logp = None if batch.sampler_logp is None else pad_right([batch.sampler_logp], 0.0, width)  # [N, T]
    t_rollout = time.perf_counter() - t0

    # 4. the loss mask and the advantages of the global batch (every rank normalises all W*N rewards)
    mask, lengths, ended = loss_mask(ids, ctx.sampling.end_token_ids, a.mask_truncated)  # [N, T], [N], [N]
    all_rewards = all_gather(batch.rewards.reshape(-1).float())  # [W*N]
    names = list(batch.per_reward)
    per_reward = torch.tensor([batch.per_reward[k] for k in names], dtype=torch.float32)  # [K, N]
    all_per_reward = all_gather(per_reward.reshape(len(names), len(batch.texts)).T.contiguous())  # [W*N, K]
    weights = torch.tensor([a.overlong_penalty if k == "overlong" else a.rewards[k] for k in names])  # [K]
    advantages = batch_advantages(ctx.advantage, G, all_rewards, all_per_reward, weights, ctx.rank, ctx.world)  # [N]

    # 5. log pi_old (mu > 1: the ratio's denominator; with top-entropy tokens, their entropies) and log pi_ref
    t1 = time.perf_counter()
    passes = dict(micro_batch_prompts=a.micro_batch_prompts, **ctx.pass_options())
    token_weights = old_logp = None
    if a.top_entropy_fraction < 1.0:  # one pass gives pi_old's log-probs and the entropies the selection needs
        logp, entropy = ctx.logprobs(ctx.model, batch.prompts, ids, with_entropy=True, **passes)  # [N, T] each
        old_logp = logp if a.mu > 1 else None
        token_weights = high_entropy_weights(entropy, mask, a.top_entropy_fraction)  # [N, T]
    elif a.mu > 1:
        old_logp = ctx.logprobs(ctx.model, batch.prompts, ids, **passes)  # [N, T]
    t_old = time.perf_counter() - t1
    with ctx.reference.policy() as reference:  # None when beta = 0: no KL term
        ref_logp = None if reference is None else ctx.logprobs(reference, batch.prompts, ids, **passes)  # [N, T]
    t_ref = time.perf_counter() - t1 - t_old
    ctx.model.train()

    total_tokens = int(all_reduce(mask.sum().reshape(1).cpu(), ctx.device).item())  # loss tokens, all ranks
    traj = Trajectory(batch.samples, batch.prompts, ids, mask, advantages.to(ctx.device), old_logp, ref_logp,
                      total_tokens, sampler_logp, token_weights)
    seconds = {"rollout": t_rollout, "old_logp": t_old, "reference": t_ref}
    return traj, RolloutRecord(rounds, batch, all_rewards, lengths, ended, seconds)


def policy_update(ctx: StepContext, counters: Counters, traj: Trajectory) -> UpdateRecord:
    """Stages 6-7: mu passes over the batch; in each, micro-batch by micro-batch, log pi_theta,
    the loss (this micro-batch's share of the whole batch's), backward; then one optimizer step."""
    a, G = ctx.settings, ctx.settings.group_size
    B = len(traj.samples)
    t0 = time.perf_counter()
    sums: dict[str, float] = {}  # token-weighted statistics of all passes, this rank
    gap = torch.zeros(3, dtype=torch.float64)  # sampler/trainer |log-prob difference|: [sum, max, tokens]
    losses, norms, trained_tokens = [], [], 0  # [mu] loss share, [mu] global gradient norm
    parts = micro_batches(B, a.micro_batch_prompts)
    widths = agreed_widths(traj.mask, [(lo * G, hi * G) for lo, hi in parts], ctx.device)  # one all-reduce
    for k in range(a.mu):
        pass_loss = 0.0
        # 6. micro-batch by micro-batch: log pi_theta, the loss share, backward (gradients accumulate)
        for (lo, hi), width in zip(parts, widths):
            rows = slice(lo * G, hi * G)  # the n = (hi - lo) * G completions of prompts lo..hi
            ids, mask = traj.completion_ids[rows, :width], traj.mask[rows, :width]  # [n, T'], padding trimmed
            logp, entropy = ctx.logprobs(ctx.model, slice_prompts(traj.prompts, lo, hi), ids, with_entropy=True,
                                         **ctx.pass_options())  # [n, T'] each, logp with gradients
            old = traj.old_logp[rows, :width] if traj.old_logp is not None else logp.detach()  # mu = 1: ratio 1
            ref = traj.ref_logp[rows, :width] if traj.ref_logp is not None else None
            weights = traj.token_weights[rows, :width] if traj.token_weights is not None else None
            sampler = traj.sampler_logp[rows, :width] if traj.sampler_logp is not None else None
            if k == 0 and sampler is not None and mask.any():
                add_sampler_gap(gap, sampler, old, mask)
            # the sampler/trainer gap, off unless configured
            weights, correction = rollout_correction(old, sampler, mask, weights, ctx.correction)
            loss, stats = policy_loss(logp, old, traj.advantages[rows], mask, ctx.loss, ref_logp=ref,
                                      token_weights=weights, total_sequences=B * G * ctx.world,
                                      total_tokens=traj.total_tokens)
            stats.update(correction)  # logged as train/rollout_is/..., train/rollout_rs/...
            # FSDP averages gradients over ranks; the share times world_size makes it a sum
            (loss * ctx.world).backward()
            pass_loss += loss.item()
            trained_tokens += int(traj.prompts["attention_mask"][lo:hi].sum()) * G + int(mask.sum())
            add_statistics(sums, stats, entropy, mask)
        # 7. clip the gradient norm, skip the update if not finite, the AdamW step (just below)
        norms.append(optimizer_step(ctx, counters, pass_loss))
        losses.append(pass_loss)
    return UpdateRecord(sums, losses, norms, trained_tokens, gap, time.perf_counter() - t0)


def optimizer_step(ctx: StepContext, counters: Counters, loss_value: float, lr: float | None = None) -> float:
    """Clip the gradient norm, skip the update when the loss or the norm is not finite (and
    stop after optimizer.max_nonfinite_steps such in a row), else set the learning rate (the
    schedule's at ``counters.update``, or ``lr``: the warm-up's, which does not advance the
    schedule) and step. Returns the global gradient norm."""
    o = ctx.settings.optimizer
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    loss_sum = float(all_reduce(torch.tensor([loss_value], dtype=torch.float64), ctx.device).item())
    if not (math.isfinite(norm) and math.isfinite(loss_sum)):
        ctx.optimizer.zero_grad(set_to_none=True)
        counters.nonfinite_in_a_row += 1
        counters.nonfinite_total += 1
        logger.warning("non-finite loss (%s) or gradient norm (%s): update skipped (%d in a row, %d in all)",
                       loss_sum, norm, counters.nonfinite_in_a_row, counters.nonfinite_total)
        if counters.nonfinite_in_a_row >= o.max_nonfinite_steps:
            raise FloatingPointError(f"{counters.nonfinite_in_a_row} non-finite updates in a row: stopping "
                                     f"(optimizer.max_nonfinite_steps={o.max_nonfinite_steps})")
        return norm
    counters.nonfinite_in_a_row = 0
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr if lr is not None else lr_at(counters.update, ctx.total_updates, o)
    ctx.optimizer.step()
    counters.applied_updates += 1
    ctx.optimizer.zero_grad(set_to_none=True)
    if lr is None:
        counters.update += 1
    return norm


# --------------------------------------------------------------------------- stages 1-3: sampling and scoring


@torch.no_grad()
def sample_round(ctx: StepContext, step: int, round_: int) -> Round:
    """Take B questions from the stream, sample G completions each, decode and score them."""
    settings, G = ctx.settings, ctx.settings.group_size
    samples, waves = ctx.stream.take(ctx.local_prompts)
    prompts = prompt_batch(samples, waves, ctx.processor, settings.prompt_template, ctx.device)
    with gathered_params(ctx.model) if ctx.fsdp else nullcontext():
        ids, sampler_logp = sample_completions(
            ctx.model, prompts, ctx.sampling, group_size=G, chunk_prompts=settings.generation_batch_prompts,
            row_seeds=completion_seeds(settings.seed, step, round_, ctx.stream.positions, G),
            sync_ranks=ctx.fsdp, real_frames=settings.audio_real_frames, return_logprobs=True,
        )  # [N, T] each
    end_ids = ctx.sampling.end_token_ids
    texts = decode_completions(ctx.processor.tokenizer, ids, end_ids)
    rewards, per_reward = compute_rewards(texts, [s for s in samples for _ in range(G)], settings.rewards)
    if settings.overlong_buffer > 0:  # DAPO's length reward: on token counts, so computed here
        lengths = completion_mask(ids, end_ids).sum(dim=1).tolist()  # [N], end token included
        per_reward["overlong"] = [soft_overlong_punishment(n, settings.max_new_tokens, settings.overlong_buffer)
                                  for n in lengths]
        rewards = [r + settings.overlong_penalty * p for r, p in zip(rewards, per_reward["overlong"])]
    return Round(samples, waves, prompts, ids, texts, torch.tensor(rewards).view(-1, G), per_reward, sampler_logp)


def short_of_signal(ctx: StepContext, rounds: list[Round]) -> bool:
    """True while any rank has fewer than B groups whose rewards differ (a collective)."""
    informative = sum(int((r.rewards.std(dim=1) > 0).sum()) for r in rounds)
    short = torch.tensor([float(informative < ctx.local_prompts)])
    return all_reduce(short, ctx.device, "max").item() != 0


def select_groups(rounds: list[Round], B: int, G: int, prompt_pad_id: int, pad_id: int) -> Round:
    """Dynamic sampling (DAPO): the B groups whose rewards differ first, then all-equal groups
    (zero advantage) if the rounds ran out; their prompts gathered from the rounds."""
    groups = [(r, i) for r in rounds for i in range(len(r.samples))]
    informative = [g for g in groups if g[0].rewards[g[1]].std() > 0]
    rest = [g for g in groups if g[0].rewards[g[1]].std() == 0]
    chosen = (informative + rest)[:B]
    width = max(r.ids.shape[1] for r in rounds)
    return Round(
        samples=[r.samples[i] for r, i in chosen],
        waves=[r.waves[i] for r, i in chosen],
        prompts=select_prompts([(r.prompts, i) for r, i in chosen], prompt_pad_id),
        ids=pad_right([r.ids[i * G : (i + 1) * G] for r, i in chosen], pad_id, width),
        texts=[t for r, i in chosen for t in r.texts[i * G : (i + 1) * G]],
        rewards=torch.stack([r.rewards[i] for r, i in chosen]),
        per_reward={k: [v for r, i in chosen for v in r.per_reward[k][i * G : (i + 1) * G]]
                    for k in rounds[0].per_reward},
        sampler_logp=None if rounds[0].sampler_logp is None else
        pad_right([r.sampler_logp[i * G : (i + 1) * G] for r, i in chosen], 0.0, width),
    )


# --------------------------------------------------------------------------- stages 4-5: advantages and log-probs


def loss_mask(ids: torch.Tensor, end_ids: list[int], mask_truncated: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens that enter the loss [N, T] (up to and including the first end token; none of a
    completion cut at the length limit with ``mask_truncated``), the completion lengths [N]
    (end token included) and which completions ended [N]."""
    mask = completion_mask(ids, end_ids)  # [N, T]
    ended = torch.isin(ids, torch.as_tensor(end_ids, device=ids.device)).any(dim=1)  # [N]
    lengths = mask.sum(dim=1)
    if mask_truncated:
        mask = mask & ended[:, None]
    return mask, lengths, ended


def batch_advantages(spec: AdvantageSpec, G: int, all_rewards: torch.Tensor, all_per_reward: torch.Tensor,
                     weights: torch.Tensor, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's slice [N] of the advantages of the global batch, from its total rewards [W*N]
    and each reward alone [W*N, K] with its weight [K]: the sum then normalised, or each reward
    normalised in its group then summed (``spec.normalization``); the sign flipped for the
    control experiment (``spec.flip_sign``)."""
    if spec.normalization == "sum_then_normalize":  # the totals, as summed by compute_rewards
        all_per_reward, weights = all_rewards[:, None], torch.ones(1)
    advantages = multi_reward_advantages(all_per_reward, weights, G, spec)  # [W*N]
    n_local = all_rewards.numel() // world
    advantages = advantages[rank * n_local : (rank + 1) * n_local]
    return -advantages if spec.flip_sign else advantages


def micro_batches(n_prompts: int, per_micro_batch: int) -> list[tuple[int, int]]:
    """(first, end) prompt indices of each micro-batch."""
    return [(i, min(i + per_micro_batch, n_prompts)) for i in range(0, n_prompts, per_micro_batch)]


def agreed_widths(mask: torch.Tensor, row_ranges: list[tuple[int, int]], device: torch.device) -> list[int]:
    """The columns [T'] each micro-batch keeps: the last loss token of that micro-batch on
    *any* rank (an all-reduce MAX, one per update), at least 1.

    Trimming the padding columns saves compute, but the width decides how many row chunks
    ``models.policy.token_logprobs`` sends through ``lm_head``, its own FSDP unit: one
    all-gather per chunk. A width of this rank's own would let the ranks issue different
    numbers of collectives (a hang, or, under NCCL, one rank's all-gather paired with another
    collective of the same size). Every rank's micro-batch j has the same number of rows, so
    with the same width every rank runs the same chunks; the extra columns are masked out.
    mask [N, T] bool; row_ranges: (first, end) rows of each micro-batch.
    """
    local = [int(mask[lo:hi].any(dim=0).nonzero().max().item()) + 1 if mask[lo:hi].any() else 1
             for lo, hi in row_ranges]
    return [int(w) for w in all_reduce(torch.tensor(local), device, "max").tolist()]


def high_entropy_weights(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """[N, T] 0/1: this rank's loss tokens among the top ``fraction`` of the whole batch's (all
    ranks) by entropy under pi_old: one threshold for the batch, so the selection does not
    depend on the micro-batching or the number of ranks."""
    all_entropy = all_gather(entropy.detach().float())  # [W*N, T], every rank pads to one T
    all_mask = all_gather(mask.to(all_entropy.dtype)).bool()
    threshold = entropy_threshold(all_entropy, all_mask, fraction)
    return high_entropy_mask(entropy.float(), mask, threshold).float()


# --------------------------------------------------------------------------- stage 6: what a micro-batch adds


def add_sampler_gap(gap: torch.Tensor, sampler_logp: torch.Tensor, old_logp: torch.Tensor,
                    mask: torch.Tensor) -> None:
    """Adds [sum, max, count] of |sampler log-prob - log pi_old| over the loss tokens to ``gap``."""
    diff = (sampler_logp - old_logp).abs()[mask]  # [loss tokens of this micro-batch]
    gap[0] += diff.sum().item()
    gap[1] = max(gap[1].item(), diff.max().item())
    gap[2] += diff.numel()


def add_statistics(sums: dict[str, float], stats: dict, entropy: torch.Tensor, mask: torch.Tensor) -> None:
    """Adds the loss statistics weighted by this micro-batch's loss tokens, its entropy sum and token count."""
    tokens = float(mask.sum().item())
    for key, value in stats.items():
        if key != "tokens":
            sums[key] = sums.get(key, 0.0) + float(value) * tokens
    sums["entropy"] = sums.get("entropy", 0.0) + float((entropy.detach() * mask).sum())
    sums["tokens"] = sums.get("tokens", 0.0) + tokens


# --------------------------------------------------------------------------- between steps


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

