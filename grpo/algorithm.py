"""GRPO as pure tensor functions. Imports nothing from the project.

Sources: GRPO, DeepSeekMath arXiv:2402.03300; clip-higher and token_mean, DAPO
arXiv:2503.14476; scale "none" and dr_grpo, Dr. GRPO arXiv:2503.20783; sequence-level
ratio, GSPO arXiv:2507.18071; k1/k2/k3, Schulman, "Approximating KL Divergence"
(joschu.net/blog/kl-approx.html). Summary with context: docs/FACTS.md.

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

N counts the completions of the whole optimizer batch (all micro-batches, all ranks).
For one micro-batch `policy_loss` returns only its *share* of J (its own terms over the
global N, or sum|o_i|), so backward on each share, the gradients accumulating, gives grad J
whatever the micro-batching; summed over ranks too.
(A trainer whose data-parallel wrapper averages gradients over ranks multiplies each
share by world_size.)

With one update per rollout (mu = 1) pi_old is pi_theta detached: rho = 1 and J sits
near 0, but grad rho = grad log pi_theta, so learning goes on.
"""

from __future__ import annotations

from typing import Iterable

import torch

ADVANTAGE_SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """mean of x over the positions where mask is true: sum(x * m) / max(sum(m), 1).

    An empty mask gives 0, not NaN. Masked-out entries of x never reach the result,
    even when they are inf or NaN.
    """
    mask = mask.bool()
    x = torch.where(mask, x, torch.zeros_like(x))  # drop masked entries (even inf / NaN)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i from the rewards, centred within each group of G completions of one prompt.

        "group" (R1-AQA):   A_i = (r_i - mean_g(r)) / (std_g(r) + eps)
        "batch":            A_i = (r_i - mean_g(r)) / (std(all N rewards) + eps)
        "none" (Dr. GRPO):  A_i =  r_i - mean_g(r)

    std uses Bessel's correction (divides by n - 1). With one value (group_size 1, or a
    batch of one) that std is undefined; it is taken as 0, so A_i = 0 / eps = 0.

    rewards: [N] ordered group by group (completions 0..G-1 belong to prompt 0, ...);
    for "batch", the std is over these N (pass every rank's rewards for a global one).
    Returns [N], float.
    """
    _check_choice("advantage scale", scale, ADVANTAGE_SCALES)
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
    if scale == "group":
        centred = centred / (bessel_std(r, 1) + eps)  # [P, G] / [P, 1]
    elif scale == "batch":
        centred = centred / (bessel_std(rewards, None) + eps)  # [P, G] / []
    return centred.reshape(-1)  # [N]


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
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))  # [B, T]
    if level == "token":
        return torch.exp(log_ratio)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=1).unsqueeze(1)  # [B, 1], |o_i| clamped >= 1
    token_logp = torch.where(mask, logp, torch.zeros_like(logp))  # [B, T]
    return torch.exp(seq_log_ratio.detach() + token_logp - token_logp.detach())  # [B, T]


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, *,
                   total_sequences: float, total_tokens: float,
                   max_completion_length: int | None = None) -> torch.Tensor:
    """This micro-batch's share of the batch loss J (the one place losses are reduced).

        "grpo":       sum_i (1/|o_i|) sum_t l_it / total_sequences
        "token_mean": sum_i sum_t l_it / total_tokens
        "dr_grpo":    sum_i sum_t l_it / (total_sequences * max_completion_length)

    total_sequences and total_tokens count the whole optimizer batch (all micro-batches,
    all ranks); then the shares sum to J. |o_i| is clamped to >= 1 so an empty completion
    adds 0 instead of NaN.
    per_token, mask: [B, T]. Returns a scalar.
    """
    _check_choice("loss type", loss_type, LOSS_TYPES)
    mask = mask.bool()
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))  # [B, T]
    if loss_type == "grpo":
        per_sequence = per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B]
        return per_sequence.sum() / total_sequences
    if loss_type == "token_mean":
        return per_token.sum() / total_tokens
    if max_completion_length is None or max_completion_length < 1:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the configured "
                         f"max new tokens) >= 1, got {max_completion_length!r}")
    return per_token.sum() / (total_sequences * max_completion_length)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    importance_level: str = "token",
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    total_sequences: float | None = None,
    total_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the GRPO loss, and its statistics.

        l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta * k_it

    rho from `importance_ratio` (token level, or GSPO's sequence level), k from
    `kl_penalty`, the reduction from `aggregate_loss`. total_sequences / total_tokens
    default to this call's own counts (B and mask.sum()): right only when the call
    sees the whole optimizer batch.

    logp (with gradient), old_logp, ref_logp, mask: [B, T]; advantages: [B].
    Returns (loss: scalar, stats): stats are detached scalars over this call's unmasked
    tokens: "kl", "ratio_mean", "clip_ratio/low_mean" (rho < 1 - eps_low with A < 0: the
    clip holds the gradient at 0), "clip_ratio/high_mean" (rho > 1 + eps_high with A > 0),
    "clip_ratio/region_mean" (either), and "tokens" (the count, to weight means across calls).
    """
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must share one [B, T] shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if ref_logp is not None and ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp {tuple(ref_logp.shape)} must have shape {tuple(logp.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probabilities)")
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    _check_choice("kl estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("loss type", loss_type, LOSS_TYPES)
    mask = mask.bool()

    # Clipped surrogate, per token. The min picks the pessimistic term: once rho has moved
    # past the clip range in the direction the advantage pushes, the gradient is 0.
    rho = importance_ratio(logp, old_logp, mask, importance_level)  # [B, T]
    adv = advantages.to(rho.dtype).unsqueeze(1)  # [B, 1]
    clipped_rho = rho.clamp(1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    per_token = -torch.minimum(rho * adv, clipped_rho * adv)  # [B, T]

    # KL to the reference, per token inside the loss (not in the reward).
    kl = None
    if ref_logp is not None:
        # Masked positions get d = 0 (so k = 0): whatever padding holds never reaches exp.
        zero = torch.zeros_like(logp)
        kl = kl_penalty(torch.where(mask, logp, zero), torch.where(mask, ref_logp, zero),
                        kl_estimator)  # [B, T]
        if beta > 0:
            per_token = per_token + beta * kl

    if total_sequences is None:
        total_sequences = logp.shape[0]
    if total_tokens is None:
        total_tokens = mask.sum()
    loss = aggregate_loss(per_token, mask, loss_type,
                          total_sequences=max(float(total_sequences), 1.0),
                          total_tokens=max(float(total_tokens), 1.0),
                          max_completion_length=max_completion_length)

    with torch.no_grad():
        low = (rho < 1.0 - eps_low) & (adv < 0)  # [B, T]
        high = (rho > 1.0 + eps_high) & (adv > 0)  # [B, T]
        stats = {
            "kl": masked_mean(kl, mask) if kl is not None else rho.new_zeros(()),
            "ratio_mean": masked_mean(rho, mask),
            "clip_ratio/low_mean": masked_mean(low.to(rho.dtype), mask),
            "clip_ratio/high_mean": masked_mean(high.to(rho.dtype), mask),
            "clip_ratio/region_mean": masked_mean((low | high).to(rho.dtype), mask),
            "tokens": mask.sum().to(rho.dtype),
        }
    return loss, {k: v.detach() for k, v in stats.items()}
