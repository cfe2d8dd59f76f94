"""GRPO as pure tensor functions. Imports nothing from the project.

Sources: GRPO, DeepSeekMath arXiv:2402.03300; clip-higher and token_mean, DAPO
arXiv:2503.14476; scale "none" and dr_grpo, Dr. GRPO arXiv:2503.20783; sequence-level
ratio, GSPO arXiv:2507.18071; the "luspo" aggregation, LUSPO arXiv:2602.05261; k1/k2/k3,
Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html). The family (policy_loss_type, dual clip, leave-one-out
baseline, per-reward normalisation, entropy token selection, rollout correction) is listed
under "Variants" below, each with its paper. Summary with context: docs/FACTS.md.

The loss, written once
----------------------
For a prompt q, the policy that generated the data (pi_old) sampled G completions
o_1..o_G with rewards r_1..r_G. o_it is token t of completion i.

    J(theta) = AGG_{i,t} [ -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
                           + beta k_it ]

J is a loss, to be minimised: the negative of GRPO's clipped surrogate objective, plus the
KL penalty. Everything below that is called "the loss" is J or a share of it.

symbol   meaning                                                       computed by
-------  ------------------------------------------------------------  ------------------
|o_i|    tokens of o_i up to and including its first end token         completion_mask
A_i      (r_i - mean_g(r)) / (std_g(r) + eps); or std of the batch,    group_advantages
         or no division (Dr. GRPO)
rho_it   pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t); GSPO:    importance_ratio
         s_i = exp(1/|o_i| sum_t log rho_it) for every t of o_i
k_it     KL(pi_theta || pi_ref) estimate at o_it, d = log pi_ref -     kl_penalty
         log pi_theta: k1 = -d, k2 = d^2/2, k3 = e^d - d - 1
         (an estimate of the KL's value; see kl_penalty for its gradient)
l_it     the bracket above, per token                                  policy_loss
AGG      grpo:       1/N         sum_i 1/|o_i| sum_t l_it              aggregate_loss
         token_mean: 1/sum_i|o_i| sum_i sum_t l_it
         dr_grpo:    1/(N L)     sum_i sum_t l_it   (L = max completion length)
         luspo:      1/N         sum_i sum_t l_it   (LUSPO: with the sequence-level
                                                     ratio, 1/N sum_i |o_i| l_i)

N counts the completions of the whole optimizer batch (all micro-batches, all ranks).
For one micro-batch `policy_loss` returns only its *share* of J (its own terms over the
global N, or sum|o_i|), so backward on each share, the gradients accumulating, gives grad J
whatever the micro-batching; summed over ranks too.
(A trainer whose data-parallel wrapper averages gradients over ranks multiplies each
share by world_size.)

With one update per rollout (mu = 1) pi_old is pi_theta detached: rho = 1 and J sits
near 0, but grad rho = grad log pi_theta, so learning goes on.

Variants
--------
Each replaces one piece of the equation above; all go through the same `aggregate_loss`,
so every one keeps the micro-batch and rank invariance. Each is a field of `LossSpec` (the
loss) or `AdvantageSpec` (the advantages), checked once when the spec is built; a new
variant is one field there and one branch in the function that reads it.

policy_loss_type (the per-token policy term p_it; l_it = p_it + beta k_it):
  clip   p = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)          GRPO / PPO
  cispo  p = -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi_theta      CISPO, MiniMax-M1
         (the clipped weight is a constant: every token keeps its         arXiv:2506.13585
         gradient, scaled, instead of the clip zeroing it)
  gmpo   p = -A_i exp(1/|o_i| sum_t sgn(A_i) min(sgn(A_i) log rho_it,     GMPO arXiv:2507.20673
                 sgn(A_i) clip(log rho_it, -eps_low, eps_high)))
         the geometric mean of the token ratios, each clipped in log space, the same
         value on every token of o_i (so "grpo" aggregation gives -A_i times it);
         sequence-level by construction, it ignores importance_level
  sapo   p = -(4 / tau) sigmoid(tau (rho - 1)) A,  tau = tau_pos if A > 0  SAPO arXiv:2511.20347
         else tau_neg: a soft gate; its slope is 1 at rho = 1 (the plain
         policy gradient on-policy) and decays smoothly away from it
  vespo  p = -sg(phi(w_i)) A_i log pi_theta,  w_i = prod_t rho_it        VESPO arXiv:2602.10693
         phi(w) = w^k e^(lambda (1 - w)),  (k, lambda) = (k_pos, lambda_pos) if A_i >= 0,
         else (k_neg, lambda_neg). w_i is the whole sequence's ratio (a product, no
         length normalisation); the gamma-shaped phi (phi(1) = 1, largest at
         w = k / lambda, -> 0 as w -> 0 or infinity) damps, softly and per completion, the
         gradient of a completion that has gone off-policy; it ignores importance_level
LUSPO (loss_type "luspo", Liu et al. 2026, arXiv:2602.05261): GSPO's objective weighs every
  completion equally (1/N sum_i l_i), so each token of a long completion counts less than one
  of a short completion; LUSPO multiplies completion i's term by |o_i|: 1/N sum_i |o_i| l_i.
  With importance_level "sequence" (the paper's setting) the policy term is the same on every
  token of o_i, so that is 1/N sum_i sum_t l_it: the "luspo" aggregation above (which sums the
  KL term over the tokens too).
dual clip (clip_ratio_c = c > 1, clip only): for A < 0, p = min(p_clip, -c A): the loss of a
  token whose ratio has run far above 1 with a negative advantage stops growing
  (Dual-clip PPO, arXiv:1912.09729).
token_weights w_it (constant): p_it -> w_it p_it. Rollout correction (a truncated importance
  weight min(pi_old / pi_sampler, C), and/or a 0/1 mask of tokens whose weight left a band:
  `rollout_correction`, from `rollout_importance_weights` and `rollout_rejection_mask`; Yao et
  al. 2025, "Your efficient RL framework secretly brings you off-policy RL training") and the
  entropy selection (`high_entropy_mask`: only the top fraction of highest-entropy tokens,
  arXiv:2506.01939) enter here. The normaliser (|o_i|, sum|o_i|) is unchanged: dropped tokens add 0.
kl_importance_weighted: k_it -> rho_it k_it (token ratio, with its gradient): the samples come
  from pi_old, and E_old[rho k] = E_theta[k]. With k3 the gradient of rho k3 is
  rho (log pi_theta - log pi_ref) grad log pi_theta, an unbiased estimate of grad KL.
Advantages: baseline "leave_one_out" (RLOO, arXiv:2402.14740) centres r_i on the mean of
  the other G - 1 rewards: r_i - (sum_g r - r_i)/(G - 1) = G/(G - 1) (r_i - mean_g r).
  `multi_reward_advantages` with "normalize_each" normalises each reward within the group
  and sums them, weighted (GDPO, arXiv:2601.05242, without its final batch normalisation);
  "sum_then_normalize" is GRPO's.
Reference: `follow_policy_` moves pi_ref towards pi_theta (TR-DPO, arXiv:2404.09656).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo", "luspo")
POLICY_LOSS_TYPES = ("clip", "cispo", "gmpo", "sapo", "vespo")
ADVANTAGE_BASELINES = ("mean", "leave_one_out")
REWARD_NORMALIZATIONS = ("sum_then_normalize", "normalize_each")
ROLLOUT_CORRECTION_LEVELS = ("token", "sequence", "geometric")
ROLLOUT_CORRECTION_MODES = ("none", *ROLLOUT_CORRECTION_LEVELS)  # a config key's choices: off, or a level
VESPO_SHAPE = (2.0, 3.0, 3.0, 2.0)  # (k_pos, lambda_pos, k_neg, lambda_neg): the VESPO authors' and TRL's defaults


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with 0 off the mask (bool), so whatever padding holds (even inf / NaN) never reaches a
    sum, an exp or a gradient."""
    return torch.where(mask, x, torch.zeros_like(x))


def _log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi_theta - log pi_old per token [B, T] (with logp's gradient), 0 off the mask (bool)."""
    return _masked(logp - old_logp, mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean of x over the positions where mask is true: sum(x * m) / max(sum(m), 1).

    An empty mask gives 0, not NaN. Masked-out entries of x never reach the result,
    even when they are inf or NaN.
    """
    mask = mask.bool()
    x = _masked(x, mask)  # drop masked entries (even inf / NaN)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


@dataclass(frozen=True)
class AdvantageSpec:
    """How rewards become advantages (`group_advantages`, `multi_reward_advantages`); checked
    once, when built. A new variant is a field here and a branch in the function that reads it.

    scale: "group" | "batch" | "none"; baseline: "mean" | "leave_one_out"; eps: added to the
    std; normalization: "sum_then_normalize" | "normalize_each" (several rewards);
    flip_sign: A -> -A (the control experiment: train against the reward; applied by the caller).
    """

    scale: str = "group"
    baseline: str = "mean"
    eps: float = 1e-4
    normalization: str = "sum_then_normalize"
    flip_sign: bool = False

    def __post_init__(self) -> None:
        _check_choice("advantage scale", self.scale, ADVANTAGE_SCALES)
        _check_choice("advantage baseline", self.baseline, ADVANTAGE_BASELINES)
        _check_choice("reward normalization", self.normalization, REWARD_NORMALIZATIONS)
        if self.eps < 0:
            raise ValueError(f"advantage eps must be >= 0, got {self.eps}")


def group_advantages(rewards: torch.Tensor, group_size: int,
                     spec: AdvantageSpec = AdvantageSpec()) -> torch.Tensor:
    """A_i from the rewards, centred within each group of G completions of one prompt.

        "group" (R1-AQA):   A_i = (r_i - b_i) / (std_g(r) + eps)
        "batch":            A_i = (r_i - b_i) / (std(all N rewards) + eps)
        "none" (Dr. GRPO):  A_i =  r_i - b_i

    b_i, the baseline: "mean", mean_g(r); "leave_one_out" (RLOO, arXiv:2402.14740), the mean
    of the group's other G - 1 rewards, so r_i - b_i = G/(G - 1) (r_i - mean_g(r)); it is
    0 for G = 1 (no other completion).

    std uses Bessel's correction (divides by n - 1). With one value (group_size 1, or a
    batch of one) that std is undefined; it is taken as 0, so A_i = 0 / eps = 0.

    rewards: [N] ordered group by group (completions 0..G-1 belong to prompt 0, ...);
    for "batch", the std is over these N (pass every rank's rewards for a global one).
    spec: `AdvantageSpec` (scale, baseline, eps; its normalization is not read here).
    Returns [N], float.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.float()

    def bessel_std(x: torch.Tensor, dim: int | None) -> torch.Tensor:
        n = x.numel() if dim is None else x.shape[dim]
        if n < 2:  # undefined with n - 1 = 0: take 0 (see docstring)
            return torch.zeros_like(x.sum() if dim is None else x.sum(dim, keepdim=True))
        return x.std(correction=1) if dim is None else x.std(dim, correction=1, keepdim=True)

    r = rewards.view(-1, group_size)  # [P, G]
    centred = r - r.mean(dim=1, keepdim=True)  # [P, G]
    if spec.baseline == "leave_one_out":
        centred = centred * (group_size / (group_size - 1)) if group_size > 1 else torch.zeros_like(r)
    if spec.scale == "group":
        centred = centred / (bessel_std(r, 1) + spec.eps)  # [P, G] / [P, 1]
    elif spec.scale == "batch":
        centred = centred / (bessel_std(rewards, None) + spec.eps)  # [P, G] / []
    return centred.reshape(-1)  # [N]


def multi_reward_advantages(per_reward: torch.Tensor, weights: torch.Tensor, group_size: int,
                            spec: AdvantageSpec = AdvantageSpec()) -> torch.Tensor:
    """A_i from K rewards per completion, weighted by w_k.

        "sum_then_normalize" (GRPO):  A = adv(sum_k w_k r_k)
        "normalize_each":             A = sum_k w_k adv(r_k)

    (spec.normalization); adv is `group_advantages` (spec's scale, eps, baseline). Normalising
    each reward on its own keeps a reward whose values spread widely (or a rare one) from
    drowning the others' signal within the group; the two agree when K = 1, or when scale is "none" (adv is then linear).
    per_reward: [N, K]; weights: [K]. Returns [N].
    """
    if per_reward.dim() != 2 or weights.shape != per_reward.shape[1:]:
        raise ValueError(f"per_reward must be [N, K] and weights [K], got {tuple(per_reward.shape)} "
                         f"and {tuple(weights.shape)}")
    per_reward = per_reward.to(torch.promote_types(per_reward.dtype, torch.float32))
    weights = weights.to(per_reward.dtype)
    if spec.normalization == "sum_then_normalize":
        return group_advantages((per_reward * weights).sum(dim=1), group_size, spec)
    columns = [weights[k] * group_advantages(per_reward[:, k], group_size, spec)
               for k in range(per_reward.shape[1])]  # K x [N]
    return torch.stack(columns, dim=1).sum(dim=1) if columns else per_reward.new_zeros(per_reward.shape[0])


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, top_fraction: float) -> torch.Tensor:
    """The entropy at or above which a token is among the top `top_fraction` of the loss tokens.

    With n loss tokens and k = ceil(top_fraction * n) (at least 1), the k-th largest entropy.
    Pass the whole optimizer batch (every micro-batch, every rank): the selection is then
    the same however the batch is cut. Returns a scalar (-inf when no token is in the mask,
    so nothing is dropped).
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    values = entropy.detach()[mask.bool()]  # [n]
    if values.numel() == 0:
        return entropy.new_tensor(float("-inf"))
    k = max(1, math.ceil(top_fraction * values.numel()))
    return values.topk(k).values[-1]


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """[B, T] bool: loss tokens whose entropy is at least `threshold` (see `entropy_threshold`).

    Training on these alone ("forking tokens", Wang et al. 2025, arXiv:2506.01939; 20% in
    the paper) enters `policy_loss` as token_weights. Ties at the threshold are all kept.
    """
    return mask.bool() & (entropy.detach() >= threshold)


def _rollout_log_weight(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                        level: str) -> torch.Tensor:
    """log pi_old / pi_sampler per token [B, T], at the requested level (masked tokens 0)."""
    _check_choice("rollout correction level", level, ROLLOUT_CORRECTION_LEVELS)
    mask = mask.bool()
    log_w = _log_ratio(logp.detach(), sampler_logp.detach(), mask)  # [B, T]
    if level == "token":
        return log_w
    per_seq = log_w.sum(dim=1, keepdim=True)  # [B, 1] log of the product of the token ratios
    if level == "geometric":
        per_seq = per_seq / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return per_seq.expand_as(log_w)


def rollout_importance_weights(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                               cap: float = 2.0, level: str = "token") -> tuple[torch.Tensor, dict]:
    """Truncated importance weights for the gap between the sampler and the trainer.

    The sampler (an inference engine, other kernels, other precision) drew the tokens with
    pi_sampler, not with the pi_old the trainer computes; the weight corrects for it:

        "token":     w_it = min(pi_old(o_it) / pi_sampler(o_it), cap)
        "sequence":  w_i  = min(prod_t pi_old(o_it) / pi_sampler(o_it), cap)
        "geometric": w_i  = min(exp(1/|o_i| sum_t log(pi_old / pi_sampler)), cap)

    (truncated IS, Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"). The result is a constant ([B, T], no gradient) for
    `policy_loss`'s token_weights; 0 off the mask. logp: the trainer's log pi_old [B, T];
    sampler_logp: the sampler's own log-probs of the same tokens [B, T].
    Returns (weights, stats): the untruncated weights' mean / min / max over loss tokens,
    the fraction truncated, and the token count (to weight means across calls).
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    mask = mask.bool()
    log_w = _rollout_log_weight(logp, sampler_logp, mask, level)  # [B, T]
    raw = torch.exp(log_w.clamp(max=80.0))  # [B, T]; a ratio of e^80 is as truncated as any
    weights = _masked(raw.clamp(max=cap), mask)
    stats = _weight_stats(raw, mask)
    stats["rollout_is/truncated_frac"] = masked_mean((raw > cap).to(raw.dtype), mask)
    return weights, stats


def rollout_rejection_mask(logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                           low: float = 0.5, high: float = 2.0, level: str = "token") -> tuple[torch.Tensor, dict]:
    """[B, T] bool: loss tokens kept because their weight pi_old / pi_sampler (at `level`, as in
    `rollout_importance_weights`) lies in [low, high]; at a sequence level a completion is
    kept or dropped whole. Returns (keep, stats) with the fraction of loss tokens rejected."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high, got {low}, {high}")
    mask = mask.bool()
    log_w = _rollout_log_weight(logp, sampler_logp, mask, level)  # [B, T]
    raw = torch.exp(log_w.clamp(max=80.0))
    keep = mask & (raw >= low) & (raw <= high)
    stats = _weight_stats(raw, mask)
    stats["rollout_is/rejected_frac"] = masked_mean((mask & ~keep).to(raw.dtype), mask)
    return keep, stats


@dataclass(frozen=True)
class CorrectionSpec:
    """The sampler/trainer gap's correction (`rollout_correction`), checked once when built:
    is_level / rs_level: "none" (off), "token", "sequence" or "geometric"; is_cap: the
    importance weight's cap C (> 0); [rs_low, rs_high]: the band a kept token's weight lies in."""

    is_level: str = "none"
    is_cap: float = 2.0
    rs_level: str = "none"
    rs_low: float = 0.5
    rs_high: float = 2.0

    def __post_init__(self) -> None:
        _check_choice("rollout importance-sampling level", self.is_level, ROLLOUT_CORRECTION_MODES)
        _check_choice("rollout rejection level", self.rs_level, ROLLOUT_CORRECTION_MODES)
        if self.is_cap <= 0:
            raise ValueError(f"cap must be > 0, got {self.is_cap}")
        if not 0 <= self.rs_low <= self.rs_high:
            raise ValueError(f"need 0 <= low <= high, got {self.rs_low}, {self.rs_high}")


def rollout_correction(logp: torch.Tensor, sampler_logp: torch.Tensor | None, mask: torch.Tensor,
                       token_weights: torch.Tensor | None = None, spec: CorrectionSpec = CorrectionSpec(),
                       ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The token weights `policy_loss` gets once the sampler/trainer gap is corrected (`spec`):

        w_it = token_weights_it * min(pi_old / pi_sampler, is_cap)      (is_level != "none")
                                * 1[rs_low <= pi_old / pi_sampler <= rs_high]  (rs_level != "none")

    each ratio at its own level ("token", "sequence", "geometric": `rollout_importance_weights`,
    `rollout_rejection_mask`); a factor that is off is 1. Returns (weights [B, T] or None when
    nothing is on and token_weights is None, stats): means over this call's loss tokens, to be
    weighted by their count across calls: "rollout_is/mean" (the untruncated weight) and
    "rollout_is/truncated_frac" with is_level on, "rollout_rs/rejected_frac" with rs_level on.
    logp: the trainer's log pi_old [B, T]; sampler_logp: the sampler's log-probs [B, T].
    """
    stats: dict[str, torch.Tensor] = {}
    if spec.is_level == "none" and spec.rs_level == "none":
        return token_weights, stats
    if sampler_logp is None:
        raise ValueError("rollout correction needs the sampler's log-probs (sampler_logp), got None")
    weights = mask.to(logp.dtype) if token_weights is None else token_weights.detach().to(logp.dtype)  # [B, T]
    if spec.is_level != "none":
        truncated, is_stats = rollout_importance_weights(logp, sampler_logp, mask, cap=spec.is_cap,
                                                         level=spec.is_level)
        weights = weights * truncated
        stats["rollout_is/mean"] = is_stats["rollout_is/mean"]
        stats["rollout_is/truncated_frac"] = is_stats["rollout_is/truncated_frac"]
    if spec.rs_level != "none":
        keep, rs_stats = rollout_rejection_mask(logp, sampler_logp, mask, low=spec.rs_low, high=spec.rs_high,
                                                level=spec.rs_level)
        weights = weights * keep.to(weights.dtype)
        stats["rollout_rs/rejected_frac"] = rs_stats["rollout_is/rejected_frac"]
    return weights, stats


def _weight_stats(raw: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    big = torch.finfo(raw.dtype).max
    any_token = mask.any()
    return {
        "rollout_is/mean": masked_mean(raw, mask),
        "rollout_is/min": torch.where(mask, raw, raw.new_tensor(big)).min() if any_token else raw.new_zeros(()),
        "rollout_is/max": torch.where(mask, raw, raw.new_tensor(-big)).max() if any_token else raw.new_zeros(()),
        "tokens": mask.sum().to(raw.dtype),
    }


@torch.no_grad()
def follow_policy_(reference: Iterable[torch.Tensor], policy: Iterable[torch.Tensor], alpha: float) -> None:
    """A reference that follows the policy (TR-DPO, Gorbatovski et al. 2024, arXiv:2404.09656):

        theta_ref <- alpha theta + (1 - alpha) theta_ref     (in place, tensor by tensor)

    alpha = 1 is the hard update (the reference becomes the policy); the trainer calls it
    every algorithm.ref_sync_every GRPO steps. The tensors pair up in order and must share
    shapes (and, sharded, placements).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    for ref, new in zip(reference, policy, strict=True):
        if alpha == 1.0:
            ref.copy_(new)
        else:
            ref.mul_(1.0 - alpha).add_(new.to(ref.dtype), alpha=alpha)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta.

    With d = log pi_ref(o) - log pi_theta(o) (element-wise):
        k1 = -d              unbiased, can be negative
        k2 = d^2 / 2         biased, >= 0
        k3 = e^d - d - 1     unbiased, >= 0 (Schulman's estimator; R1-AQA's choice)
    (Schulman, "Approximating KL Divergence", joschu.net/blog/kl-approx.html.)
    k3 is computed as expm1(d) - d: the same value, accurate (and never negative)
    when d is close to 0.

    "Unbiased" is about the KL's *value*. Added to the loss and differentiated through
    log pi_theta with the sampled tokens held fixed, k1 and k3 do not give an unbiased
    estimate of the KL's *gradient*: grad k1 = grad log pi_theta has expectation 0 under
    pi_theta, and grad k3 = (1 - e^d) grad log pi_theta has the expectation of
    grad KL(pi_ref || pi_theta), the reverse direction. (grad k2 = -d grad log pi_theta does
    have the expectation of grad KL(pi_theta || pi_ref).) The KL logged as a metric is the
    value; the penalty's effect on training is that of its gradient.

    logp, ref_logp: same shape, e.g. [B, T]. Returns that shape.
    """
    _check_choice("kl estimator", estimator, KL_ESTIMATORS)
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(d) - d


def completion_mask(completion_ids: torch.Tensor,
                    end_token_ids: int | Iterable[int] | torch.Tensor) -> torch.Tensor:
    """[B, T] bool: true up to and including the first token whose id is in end_token_ids.

    Rows without an end token are all true (cut at the length limit). The mask comes
    from positions (how many end tokens came strictly before t), never from comparing
    ids with the pad id, so pad == eos and pad ids inside the completion are handled.

    completion_ids: [B, T] int. end_token_ids: an int, or a list / set / tuple / tensor of ids.
    """
    if completion_ids.dim() != 2:
        raise ValueError(f"completion_ids must be [B, T], got shape {tuple(completion_ids.shape)}")
    if isinstance(end_token_ids, int):
        end_token_ids = [end_token_ids]
    ends = torch.as_tensor(sorted(end_token_ids) if isinstance(end_token_ids, (set, frozenset))
                           else end_token_ids, dtype=completion_ids.dtype,
                           device=completion_ids.device).reshape(-1)
    is_end = torch.isin(completion_ids, ends).long()  # [B, T]
    ends_before = is_end.cumsum(dim=1) - is_end  # [B, T] end tokens strictly before t
    return ends_before == 0  # [B, T]


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                     level: str = "token") -> torch.Tensor:
    """[B, T] importance weights, value and gradient.

        "token":    rho_it = exp(log pi_theta(o_it) - log pi_old(o_it))
        "sequence": s_it = sg(s_i) * exp(log pi_theta(o_it) - sg(log pi_theta(o_it))),
                    s_i = exp(1/|o_i| sum_t (log pi_theta(o_it) - log pi_old(o_it)))

    The sequence form is GSPO-token (Zheng et al. 2025, arXiv:2507.18071; sg is
    stop-gradient): every token of completion i carries the value s_i, so clipping acts
    on the whole completion at once, while the gradient flows per token as
    s_i * grad log pi(o_it).
    Because A_i is the same for every token of completion i, the gradient (clipping
    included) equals that of using s_i itself, GSPO's sequence ratio, under every
    aggregation; the token form only differs once advantages vary per token.

    Masked positions are set to log-ratio 0 before any exp, so whatever they hold
    (padding, inf) gives neither NaN values nor NaN gradients.
    logp, old_logp, mask: [B, T]. Returns [B, T].
    """
    _check_choice("importance level", level, IMPORTANCE_LEVELS)
    mask = mask.bool()
    log_ratio = _log_ratio(logp, old_logp, mask)  # [B, T]
    if level == "token":
        return torch.exp(log_ratio)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=1).unsqueeze(1)  # [B, 1], |o_i| clamped >= 1
    token_logp = _masked(logp, mask)  # [B, T]
    return torch.exp(seq_log_ratio.detach() + token_logp - token_logp.detach())  # [B, T]


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
                   total_sequences: float, total_tokens: float,
                   max_completion_length: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the batch loss J (the one place losses are reduced).

        "grpo":       sum_i (1/|o_i|) sum_t l_it / total_sequences
        "token_mean": sum_i sum_t l_it / total_tokens
        "dr_grpo":    sum_i sum_t l_it / (total_sequences * max_completion_length)
        "luspo":      sum_i sum_t l_it / total_sequences   (LUSPO: each completion weighs |o_i|)

    total_sequences and total_tokens count the whole optimizer batch (all micro-batches,
    all ranks); then the shares sum to J. |o_i| is clamped to >= 1 so an empty completion
    adds 0 instead of NaN.
    per_token, mask: [B, T]. Returns a scalar.
    """
    _check_choice("loss type", loss_type, LOSS_TYPES)
    mask = mask.bool()
    per_token = _masked(per_token, mask)  # [B, T]
    if loss_type == "grpo":
        per_sequence = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        return per_sequence.sum() / total_sequences
    if loss_type == "token_mean":
        return per_token.sum() / total_tokens
    if loss_type == "luspo":
        return per_token.sum() / total_sequences
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the configured "
                         f"max new tokens) >= 1, got {max_completion_length!r}")
    return per_token.sum() / (total_sequences * max_completion_length)


def vespo_weights(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  shape: tuple[float, float, float, float] = VESPO_SHAPE) -> torch.Tensor:
    """VESPO's gamma weight phi(w_i) [B, 1], a constant (no gradient).

        w_i = prod_t pi_theta(o_it) / pi_old(o_it)        (the sequence's own ratio)
        phi(w) = w^k exp(lambda (1 - w)),  (k, lambda) = (k_pos, lambda_pos) if A_i >= 0
                                                         else (k_neg, lambda_neg)

    computed in log space: log phi = k log w + lambda (1 - w). phi(1) = 1, so on-policy the
    loss -phi A log pi has GRPO's gradient. shape: (k_pos, lambda_pos, k_neg, lambda_neg).
    """
    k_pos, lambda_pos, k_neg, lambda_neg = shape
    mask = mask.bool()
    log_w = _log_ratio(logp.detach(), old_logp, mask).sum(dim=1, keepdim=True)  # [B, 1]
    positive = advantages.detach().unsqueeze(1) >= 0  # [B, 1]
    k = torch.where(positive, log_w.new_tensor(k_pos), log_w.new_tensor(k_neg))  # [B, 1]
    lam = torch.where(positive, log_w.new_tensor(lambda_pos), log_w.new_tensor(lambda_neg))  # [B, 1]
    # w = e^80 already gives phi = exp(-lambda e^80) = 0; the clamp only keeps exp finite.
    w = torch.exp(log_w.clamp(max=80.0))
    return torch.exp(k * log_w + lam * (1.0 - w))  # [B, 1]


@dataclass(frozen=True)
class LossSpec:
    """Which loss `policy_loss` computes: the settings of the equations in the module docstring,
    checked once, when built (the trainer builds one at set-up from the config).

    Adding a variant is a field here (its check in `__post_init__`) and a branch where it
    acts: `policy_term` (the per-token policy term), `add_kl_term` (the KL term) or
    `aggregate_loss` (the reduction).

    policy_loss_type  clip | cispo | gmpo | sapo | vespo           ("Variants")
    eps_low/eps_high  the clip range [1 - eps_low, 1 + eps_high]   (DAPO clip-higher: eps_high 0.28)
    importance_level  token | sequence (GSPO)
    clip_ratio_c      the dual clip's c (> 1, clip only), None: off
    sapo_tau_pos/neg  SAPO's gate temperatures (> 0)
    vespo_shape       VESPO's (k_pos, lambda_pos, k_neg, lambda_neg): k >= 0, lambda > 0
    loss_type         grpo | token_mean | dr_grpo | luspo           (AGG)
    max_completion_length  L of dr_grpo (the configured max new tokens)
    beta              the KL coefficient (>= 0; > 0 needs ref_logp)
    kl_estimator      k1 | k2 | k3
    kl_importance_weighted  k -> rho k
    """

    policy_loss_type: str = "clip"
    eps_low: float = 0.2
    eps_high: float = 0.2
    importance_level: str = "token"
    clip_ratio_c: float | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_shape: tuple[float, float, float, float] = VESPO_SHAPE
    loss_type: str = "grpo"
    max_completion_length: int | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_importance_weighted: bool = False

    def __post_init__(self) -> None:
        """Raise ValueError, naming the setting, where the settings disagree."""
        _check_choice("policy loss type", self.policy_loss_type, POLICY_LOSS_TYPES)
        _check_choice("importance level", self.importance_level, IMPORTANCE_LEVELS)
        _check_choice("loss type", self.loss_type, LOSS_TYPES)
        _check_choice("kl estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError(f"eps_low and eps_high must be >= 0, got {self.eps_low}, {self.eps_high}")
        c = self.clip_ratio_c
        if c is not None and (self.policy_loss_type != "clip" or not c > 1.0):
            raise ValueError(f"clip_ratio_c (the dual clip) needs policy_loss_type 'clip' and a value > 1, "
                             f"got {c!r} with {self.policy_loss_type!r}")
        if self.sapo_tau_pos <= 0 or self.sapo_tau_neg <= 0:
            raise ValueError(f"sapo temperatures must be > 0, got {self.sapo_tau_pos}, {self.sapo_tau_neg}")
        v = self.vespo_shape
        if len(v) != 4 or v[0] < 0 or v[2] < 0 or v[1] <= 0 or v[3] <= 0:
            raise ValueError(f"vespo_shape (k_pos, lambda_pos, k_neg, lambda_neg) needs k >= 0 and lambda > 0, "
                             f"got {v!r}")
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the configured "
                             f"max new tokens) >= 1, got {self.max_completion_length!r}")


def policy_term(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token policy term p_it [B, T] of spec.policy_loss_type (module docstring,
    "Variants"), and the importance weight rho [B, T] it was built from (for statistics).
    logp (with gradient), old_logp, mask: [B, T]; advantages: [B]."""
    mask = mask.bool()
    rho = importance_ratio(logp, old_logp, mask, spec.importance_level)  # [B, T]
    adv = advantages.to(rho.dtype).unsqueeze(1)  # [B, 1]
    kind = spec.policy_loss_type
    if kind == "clip":
        # The min picks the pessimistic term: once rho has moved past the clip range in the
        # direction the advantage pushes, the gradient is 0.
        clipped_rho = rho.clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)  # [B, T]
        per_token = -torch.minimum(rho * adv, clipped_rho * adv)  # [B, T]
        if spec.clip_ratio_c is not None:
            # Dual clip: with A < 0 the term -rho A grows without bound as rho does; cap it at -c A.
            per_token = torch.where(adv < 0, torch.minimum(per_token, -spec.clip_ratio_c * adv), per_token)
        return per_token, rho
    if kind == "cispo":
        weight = rho.detach().clamp(1.0 - spec.eps_low, 1.0 + spec.eps_high)  # [B, T] constant
        return -weight * adv * _masked(logp, mask), rho
    if kind == "vespo":
        phi = vespo_weights(logp, old_logp, advantages, mask, spec.vespo_shape)  # [B, 1] constant
        return -phi * adv * _masked(logp, mask), rho
    if kind == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, spec.sapo_tau_pos),
                          torch.full_like(adv, spec.sapo_tau_neg))  # [B, 1]
        return -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * adv, rho
    # gmpo: the geometric mean of the token ratios, each clipped in log space on the side the
    # advantage pushes (sgn(A) min(sgn(A) x, sgn(A) clip(x)) = the pessimistic of the two).
    log_ratio = _log_ratio(logp, old_logp, mask)  # [B, T]
    sign = torch.where(adv < 0, -torch.ones_like(adv), torch.ones_like(adv))  # [B, 1]; A = 0 adds 0 anyway
    clipped = log_ratio.clamp(-spec.eps_low, spec.eps_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped)  # [B, T]
    seq_ratio = torch.exp(masked_mean(pessimistic, mask, dim=1)).unsqueeze(1)  # [B, 1]
    return (-adv * seq_ratio).expand_as(logp), rho


def _check_shapes(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  ref_logp: torch.Tensor | None, token_weights: torch.Tensor | None, beta: float) -> None:
    """Raise ValueError, naming the argument, where `policy_loss`'s tensors disagree in shape,
    or the spec asks for a KL term without ref_logp."""
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must have shape {tuple(logp.shape)}")
    if token_weights is not None and token_weights.shape != logp.shape:
        raise ValueError(f"token_weights {tuple(token_weights.shape)} must have shape {tuple(logp.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probabilities)")


def masked_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """The per-token KL estimate k_it [B, T] to the reference (`kl_penalty`), 0 at masked positions.
    logp, ref_logp: [B, T]; mask: [B, T] bool."""
    # Masked positions get d = 0 (so k = 0): whatever padding holds never reaches exp.
    return kl_penalty(_masked(logp, mask), _masked(ref_logp, mask), estimator)  # [B, T]


def add_kl_term(per_token: torch.Tensor, kl: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor,
                mask: torch.Tensor, beta: float, *, importance_weighted: bool) -> torch.Tensor:
    """per_token + beta * k, or with importance_weighted per_token + beta * rho * k, where rho is
    the token ratio exp(logp - old_logp) (with gradient; 1 at masked positions). All [B, T]."""
    if importance_weighted:
        token_rho = torch.exp(_log_ratio(logp, old_logp, mask))  # [B, T], with gradient
        return per_token + beta * token_rho * kl
    return per_token + beta * kl


@torch.no_grad()
def policy_loss_stats(rho: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None,
                      spec: LossSpec) -> dict[str, torch.Tensor]:
    """`policy_loss`'s statistics (its docstring names them): detached scalars over the unmasked
    tokens. rho, mask (bool), kl: [B, T]; advantages: [B]."""
    adv = advantages.to(rho.dtype).unsqueeze(1)  # [B, 1]
    low = (rho < 1.0 - spec.eps_low) & (adv < 0)  # [B, T]
    high = (rho > 1.0 + spec.eps_high) & (adv > 0)  # [B, T]
    c = spec.clip_ratio_c
    dual = (rho > c) & (adv < 0) if c is not None else torch.zeros_like(low)
    stats = {
        "kl": masked_mean(kl, mask) if kl is not None else rho.new_zeros(()),
        "ratio_mean": masked_mean(rho, mask),
        "clip_ratio/low_mean": masked_mean(low.to(rho.dtype), mask),
        "clip_ratio/high_mean": masked_mean(high.to(rho.dtype), mask),
        "clip_ratio/region_mean": masked_mean((low | high).to(rho.dtype), mask),
        "clip_ratio/dual_mean": masked_mean(dual.to(rho.dtype), mask),
        "tokens": mask.sum().to(rho.dtype),
    }
    return {k: v.detach() for k, v in stats.items()}


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                spec: LossSpec = LossSpec(), *, ref_logp: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, total_sequences: float | None = None,
                total_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the GRPO loss, and its statistics.

        l_it = w_it p_it + beta * k_it,   p_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)

    for policy_loss_type "clip"; `spec` (a `LossSpec`) chooses the variant: the other policy
    terms (cispo, gmpo, sapo, vespo), the dual clip, the KL estimator and its weighting,
    the aggregation (module docstring, "Variants"). token_weights w (constant, [B, T]; 1 when
    None): the high-entropy selection and the rollout correction.
    p and rho from `policy_term` (rho token level, or GSPO's sequence level), k from
    `masked_kl`, beta * k from `add_kl_term`, the reduction from `aggregate_loss`, the
    statistics from `policy_loss_stats`. total_sequences / total_tokens (the whole optimizer
    batch's) default to this call's own counts (B and mask.sum()): right only when the call
    sees the whole optimizer batch.

    logp (with gradient), old_logp, ref_logp, mask: [B, T]; advantages: [B].
    Returns (loss: scalar, stats): stats are detached scalars over this call's unmasked
    tokens: "kl", "ratio_mean", "clip_ratio/low_mean" (rho < 1 - eps_low with A < 0: the
    clip holds the gradient at 0), "clip_ratio/high_mean" (rho > 1 + eps_high with A > 0),
    "clip_ratio/region_mean" (either), "clip_ratio/dual_mean" (rho > c with A < 0: the dual
    clip holds), and "tokens" (the count, to weight means across calls).
    """
    _check_shapes(logp, old_logp, advantages, mask, ref_logp, token_weights, spec.beta)
    mask = mask.bool()

    per_token, rho = policy_term(logp, old_logp, advantages, mask, spec)  # [B, T], [B, T]
    if token_weights is not None:
        per_token = per_token * token_weights.detach().to(per_token.dtype)

    # KL to the reference, per token inside the loss (not in the reward).
    kl = masked_kl(logp, ref_logp, mask, spec.kl_estimator) if ref_logp is not None else None  # [B, T]
    if kl is not None and spec.beta > 0:
        per_token = add_kl_term(per_token, kl, logp, old_logp, mask, spec.beta,
                                importance_weighted=spec.kl_importance_weighted)

    if total_sequences is None:
        total_sequences = logp.shape[0]
    if total_tokens is None:
        total_tokens = mask.sum()
    loss = aggregate_loss(per_token, mask, spec.loss_type,
                          total_sequences=max(float(total_sequences), 1.0),
                          total_tokens=max(float(total_tokens), 1.0),
                          max_completion_length=spec.max_completion_length)
    return loss, policy_loss_stats(rho, advantages, mask, kl, spec)
