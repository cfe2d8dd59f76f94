"""The gradient of the optimizer batch does not depend on how the batch is cut.

Whatever the micro-batching and the number of ranks, the gradient must be that of the whole
optimizer batch (docs/FACTS.md, "GRPO and its variants"). Each micro-batch's `policy_loss` is
its *share* of the batch loss (its own terms over the global counts total_sequences / total_tokens), so:

    sum over micro-batches (and ranks) of grad(share) == grad(whole-batch loss)

for every loss_type and importance level, with completions of unequal lengths. The model
is a small linear softmax policy pi(. | x) = softmax(W x), in float64, so the comparison
is tight.
"""

from __future__ import annotations

import os
import time
from itertools import product

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo.algorithm import LossSpec, group_advantages, policy_loss

DTYPE = torch.float64
V, D, T = 11, 6, 7  # vocabulary, feature size, completion width
PROMPTS, G = 4, 4
N = PROMPTS * G  # completions in the optimizer batch
MAX_LEN = 10  # configured max new tokens (dr_grpo's constant)
LOSS_TYPES = ("grpo", "token_mean", "dr_grpo", "luspo")
CASES = list(product(LOSS_TYPES, ("token", "sequence")))
# The family's variants (grpo/algorithm.py, "Variants"), each checked under every loss_type.
VARIANTS = {
    "cispo": dict(policy_loss_type="cispo"),
    "gmpo": dict(policy_loss_type="gmpo", eps_low=0.4, eps_high=0.4),
    "sapo": dict(policy_loss_type="sapo"),
    "vespo": dict(policy_loss_type="vespo"),
    "dual_clip": dict(clip_ratio_c=1.5),
    "kl_importance_weighted": dict(kl_importance_weighted=True),
    "token_weights": dict(token_weights=True),  # the rollout-correction / entropy weights, per row
}
VARIANT_CASES = list(product(LOSS_TYPES, VARIANTS))


def make_batch(seed: int = 0) -> dict:
    """One optimizer batch: token contexts, ids, unequal lengths (one empty completion),
    advantages, pi_old and pi_ref log-probabilities a little off the current policy so
    that clipping and the KL both act."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(V, D, generator=g, dtype=DTYPE)  # [V, D] initial weights
    x = torch.randn(N, T, D, generator=g, dtype=DTYPE)  # [N, T, D]
    ids = torch.randint(0, V, (N, T), generator=g)  # [N, T]
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[5] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [N, T]
    rewards = torch.randint(0, 3, (N,), generator=g).to(DTYPE)
    with torch.no_grad():
        logp = token_logp(W0, x, ids)
        old_logp = logp + 0.3 * torch.randn(N, T, generator=g, dtype=DTYPE)
        ref_logp = logp + 0.3 * torch.randn(N, T, generator=g, dtype=DTYPE)
    weights = torch.rand(N, T, generator=g, dtype=DTYPE) * 2  # [N, T] constant token weights
    return dict(W0=W0, x=x, ids=ids, mask=mask, advantages=group_advantages(rewards, G),
                old_logp=old_logp, ref_logp=ref_logp, weights=weights)


def token_logp(W: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(o_t | x_t) for a linear softmax policy. x: [n, T, D], ids: [n, T] -> [n, T]."""
    return torch.log_softmax(x @ W.T, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


def loss_share(W, batch, rows: slice, loss_type, level, variant: str | None = None, **totals) -> torch.Tensor:
    """Forward the completions `rows` only (as a micro-batch would) and return their share."""
    logp = token_logp(W, batch["x"][rows], batch["ids"][rows])
    options = dict(eps_low=0.2, eps_high=0.28)
    options.update(VARIANTS[variant] if variant else {})
    weights = batch["weights"][rows] if options.pop("token_weights", False) else None
    spec = LossSpec(beta=0.04, importance_level=level, loss_type=loss_type, max_completion_length=MAX_LEN, **options)
    loss, _ = policy_loss(logp, batch["old_logp"][rows], batch["advantages"][rows], batch["mask"][rows], spec,
                          ref_logp=batch["ref_logp"][rows], token_weights=weights, **totals)
    return loss


def whole_batch_grad(batch, loss_type, level, variant=None) -> torch.Tensor:
    """The reference: one call over the whole batch, default (= whole-batch) counts."""
    W = batch["W0"].clone().requires_grad_(True)
    loss_share(W, batch, slice(0, N), loss_type, level, variant).backward()
    return W.grad


def micro_batches(lo: int, hi: int, n_micro: int) -> list[slice]:
    """Split completions lo..hi into n_micro equal micro-batches (whole groups each)."""
    size = (hi - lo) // n_micro
    return [slice(lo + k * size, lo + (k + 1) * size) for k in range(n_micro)]


def accumulated_grad(batch, loss_type, level, parts, variant=None, **totals) -> torch.Tensor:
    """backward on each share; the gradients accumulate in W.grad, as in the trainer."""
    W = batch["W0"].clone().requires_grad_(True)
    for rows in parts:
        loss_share(W, batch, rows, loss_type, level, variant, **totals).backward()
    return W.grad


def test_the_batch_is_a_real_test_case():
    """Unequal lengths, an empty completion, and ratios outside the clip range."""
    batch = make_batch()
    lengths = batch["mask"].sum(dim=1)
    assert len(set(lengths.tolist())) >= 4 and (lengths == 0).any()
    _, stats = policy_loss(token_logp(batch["W0"], batch["x"], batch["ids"]), batch["old_logp"],
                           batch["advantages"], batch["mask"])
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("loss_type,level", CASES)
@pytest.mark.parametrize("n_micro", [1, 2, 4])
def test_micro_batches_sum_to_the_whole_batch(loss_type, level, n_micro):
    batch = make_batch()
    totals = dict(total_sequences=N, total_tokens=int(batch["mask"].sum()))
    got = accumulated_grad(batch, loss_type, level, micro_batches(0, N, n_micro), **totals)
    torch.testing.assert_close(got, whole_batch_grad(batch, loss_type, level), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type,variant", VARIANT_CASES)
@pytest.mark.parametrize("n_micro", [2, 4])
def test_variants_micro_batches_sum_to_the_whole_batch(loss_type, variant, n_micro):
    batch = make_batch()
    totals = dict(total_sequences=N, total_tokens=int(batch["mask"].sum()))
    got = accumulated_grad(batch, loss_type, "token", micro_batches(0, N, n_micro), variant, **totals)
    expected = whole_batch_grad(batch, loss_type, "token", variant)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(expected, whole_batch_grad(batch, loss_type, "token"))  # the variant acts


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_local_counts_would_be_wrong(loss_type):
    """The negative control: shares over each micro-batch's *own* counts (the classic bug)
    do not add up to the whole batch, so the test above can see the difference."""
    batch = make_batch()
    got = accumulated_grad(batch, loss_type, "token", micro_batches(0, N, 4))
    assert not torch.allclose(got, whole_batch_grad(batch, loss_type, "token"), rtol=1e-3)


# ----------------------------------------------------------------------------------------
# Two ranks (gloo on CPU)
# ----------------------------------------------------------------------------------------

WORLD = 2
MICRO_PER_RANK = 2


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: half the batch in micro-batches, global counts by all_reduce, then the
    trainer's gradient reduction. Two reductions are checked:

      "sum": all_reduce(SUM) of the gradients of the plain shares;
      "avg": the trainer's FSDP averages gradients over ranks, so it back-propagates
             share * world_size; here the average is all_reduce(SUM) / world_size
             (gloo has no ReduceOp.AVG), which is what FSDP's reduce-scatter computes.

    Both must equal the single-process whole-batch gradient.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = make_batch()
        per_rank = N // world
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        parts = micro_batches(lo, hi, MICRO_PER_RANK)

        # global counts: each rank contributes its own completions and tokens
        counts = torch.tensor([hi - lo, batch["mask"][lo:hi].sum().item()], dtype=DTYPE)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        totals = dict(total_sequences=int(counts[0]), total_tokens=int(counts[1]))

        results = {}
        for (loss_type, level), mode in product(CASES, ("sum", "avg")):
            W = batch["W0"].clone().requires_grad_(True)
            factor = world if mode == "avg" else 1
            for rows in parts:
                (loss_share(W, batch, rows, loss_type, level, **totals) * factor).backward()
            grad = W.grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            if mode == "avg":
                grad /= world
            results[(loss_type, level, mode)] = grad
        for loss_type, variant in VARIANT_CASES:
            W = batch["W0"].clone().requires_grad_(True)
            for rows in parts:
                loss_share(W, batch, rows, loss_type, "token", variant, **totals).backward()
            grad = W.grad.clone()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            results[(loss_type, variant, "sum")] = grad
        torch.save({"totals": totals, "grads": results}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_sum_to_the_whole_batch(tmp_path):
    ctx = mp.spawn(_rank_worker, args=(WORLD, str(tmp_path / "store"), str(tmp_path)),
                   nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 120 s")

    batch = make_batch()
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["totals"] == dict(total_sequences=N, total_tokens=int(batch["mask"].sum()))
        for (loss_type, level, mode), grad in out["grads"].items():
            variant = level if level in VARIANTS else None
            expected = whole_batch_grad(batch, loss_type, "token" if variant else level, variant)
            torch.testing.assert_close(grad, expected, rtol=1e-12,
                                       atol=1e-14, msg=lambda m: f"{loss_type}/{level}/{mode}: {m}")
        assert len(out["grads"]) == 2 * len(CASES) + len(VARIANT_CASES)
