"""The logged metrics of a step, computed in one place from what the step returns.

Every value is over all ranks (the collectives are no-ops in one process): rewards and
lengths as means over the global batch, the loss statistics as means weighted by loss tokens,
the loss and gradient norm as means over the mu passes. Keys: ``train/...`` (what the step
computed), ``timing/...`` (seconds), ``perf/...`` (throughput and memory).
"""

from __future__ import annotations

import resource

import torch

from data.datasets import Sample
from grpo.step import RolloutRecord, StepRecord, UpdateRecord
from models.collectives import all_reduce, global_mean, global_sum


def grpo_metrics(record: StepRecord, tasks: list[str], G: int, lr: float, device) -> dict:
    """The metrics of one GRPO step. ``tasks``: the question types of the training set (each
    gets its own accuracy and zero-std fraction when there are several); ``lr``: the
    learning rate of the last update."""
    metrics = rollout_metrics(record.rollout, tasks, G, device)
    traj = record.trajectory
    if traj.token_weights is not None:
        metrics["train/entropy_selected_frac"] = (global_sum(traj.token_weights.float().cpu(), device)
                                                  / max(traj.total_tokens, 1))
    metrics.update(update_metrics(record.update, lr, device))
    metrics.update(sampler_gap_metrics(record.update.gap, device))
    return metrics


def rollout_metrics(seen: RolloutRecord, tasks: list[str], G: int, device) -> dict:
    """Rewards, lengths and timings of the rollout."""
    first = seen.rounds[0]  # frac_reward_zero_std and the per-task numbers: before dynamic sampling
    B = len(first.samples)
    zero_std_first = (first.rewards.std(dim=1) == 0).float() if G > 1 else torch.ones(B)  # [B]
    group_std = seen.all_rewards.view(-1, G).std(dim=1) if G > 1 else torch.zeros(seen.all_rewards.numel())
    metrics = {
        "train/reward": seen.all_rewards.mean().item(),
        "train/reward_std": group_std.mean().item(),
        "train/frac_reward_zero_std": global_mean(zero_std_first, device),
        "train/completions/mean_length": global_mean(seen.lengths.float(), device),
        "train/completions/clipped_ratio": global_mean((~seen.ended).float(), device),
        "train/sampling_rounds": float(len(seen.rounds)),
        **{f"timing/{name}": seconds for name, seconds in seen.seconds.items()},
        "perf/generated_tokens_per_second": global_sum(seen.lengths.float(), device) / max(seen.seconds["rollout"],
                                                                                          1e-9),
    }
    for name, values in seen.batch.per_reward.items():
        metrics[f"train/rewards/{name}/mean"] = global_mean(torch.tensor(values), device)
    if len(tasks) > 1 and "accuracy" in first.per_reward:  # which question types carry signal
        accuracy = torch.tensor(first.per_reward["accuracy"]).view(-1, G).mean(dim=1)  # [B]
        for name, per_group in (("rewards/accuracy", accuracy), ("frac_reward_zero_std", zero_std_first)):
            for task, value in per_task_means(first.samples, per_group, tasks, device).items():
                metrics[f"train/{name}/{task}"] = value
    return metrics


def per_task_means(samples: list[Sample], values: torch.Tensor, tasks: list[str], device) -> dict[str, float]:
    """Mean of ``values`` [B] over each task's questions, over all ranks (same tasks on every rank)."""
    sums = torch.zeros(2, len(tasks), dtype=torch.float64)  # [sum, count] per task
    for s, v in zip(samples, values.tolist()):
        sums[0, tasks.index(s.task)] += v
        sums[1, tasks.index(s.task)] += 1
    sums = all_reduce(sums, device).cpu()
    return {t: (sums[0, i] / sums[1, i]).item() for i, t in enumerate(tasks) if sums[1, i] > 0}


def update_metrics(seen: UpdateRecord, lr: float, device) -> dict:
    """Token-weighted means of the loss statistics; the loss and gradient norm as means over the mu passes."""
    keys = sorted(seen.sums)
    reduced = all_reduce(torch.tensor([seen.sums[k] for k in keys], dtype=torch.float64), device)
    totals = dict(zip(keys, reduced.tolist()))
    tokens = max(totals.pop("tokens"), 1.0)
    metrics = {f"train/{k}": v / tokens for k, v in totals.items()}  # token-weighted means
    metrics.update({
        "train/loss": float(all_reduce(torch.tensor(seen.losses, dtype=torch.float64), device).mean().item()),
        "train/grad_norm": sum(seen.norms) / len(seen.norms),
        "train/learning_rate": lr,
        "timing/update": seen.seconds,
        "perf/train_tokens_per_second": global_sum(torch.tensor([float(seen.trained_tokens)]), device)
        / max(seen.seconds, 1e-9),
    })
    return metrics


def sampler_gap_metrics(gap: torch.Tensor, device) -> dict:
    """The sampler/trainer gap: mean and max over the loss tokens of |log-prob the rollout
    sampled with - log pi_old the loss uses| (the old-policy pass when mu > 1, else the first
    update pass; both under the sampling temperature, over the whole vocabulary). Near 0 in
    fp32; in bf16 the KV-cache decoding and the packed forward round differently
    (benchmarks/RESULTS.md gives sizes); a large value means the loss scores tokens under
    another distribution than the sampler's."""
    total, tokens = all_reduce(gap[[0, 2]].clone(), device).tolist()
    largest = all_reduce(gap[1:2].clone(), device, "max").item()
    return {"train/sampler_logprob_diff/mean": total / max(tokens, 1.0),
            "train/sampler_logprob_diff/max": largest}


def sft_metrics(loss: float, grad_norm: float, lr: float, seconds: float, device) -> dict:
    """The metrics of one SFT or format warm-up step."""
    return {
        "train/loss": float(all_reduce(torch.tensor([loss], dtype=torch.float64), device).item()),
        "train/grad_norm": grad_norm,
        "train/learning_rate": lr,
        "timing/update": seconds,
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
