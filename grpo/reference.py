"""The reference policy pi_ref of the KL term, chosen once at set-up; the one place it is decided.

    NoReference   no KL term (beta = 0, or SFT): no pass, nothing to follow or save
    FrozenCopy    a second, frozen copy of the model (beta > 0 without LoRA)
    AdaptersOff   LoRA: the policy itself with its adapters switched off, no second copy
                  (with beta = 0 there is no reference pass, but the format warm-up's
                  adapters are still merged into the base, as with a reference)

Each answers what the run asks of its reference: the model whose log-probs are log pi_ref
(``policy``), the snapshot after the format warm-up (``after_format_warmup``: the KL then anchors
GRPO to the model that formats, as R1-AQA's reference is the instruction-tuned model it starts
from), when and how it follows the policy (``sync_due``, ``follow``: TR-DPO, arXiv:2404.09656),
what a checkpoint must save besides the policy (``saved_models``) and whether the policy's
frozen weights still equal model.path (``base_changed``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from grpo.algorithm import follow_policy_
from models.lora import adapters_disabled, merge_adapters_


def reference_kind(cfg) -> str:
    """What pi_ref of the KL term is, from the config alone: "none" (SFT, or beta = 0: no KL
    term), "copy" (a frozen second model) or "adapters_off" (LoRA: the policy, adapters off).
    The memory plan reads it too; ``choose_reference`` builds the object."""
    a = cfg.algorithm
    if a.name != "grpo" or a.beta == 0:
        return "none"
    return "adapters_off" if cfg.lora.enabled else "copy"


class NoReference:
    """No KL term. The schedule (``sync_due``) is shared by the three kinds.

    format_warmup_steps: the format warm-up's length (0: none); sync_every: the reference follows
    the policy every that many GRPO steps (0: never)."""

    kind = "none"

    def __init__(self, format_warmup_steps: int = 0, sync_every: int = 0):
        self.format_warmup_steps, self.sync_every = format_warmup_steps, sync_every

    @contextmanager
    def policy(self) -> Iterator[torch.nn.Module | None]:
        """pi_ref as a model inside the block, or None: no reference pass."""
        yield None

    def after_format_warmup(self) -> None:
        """pi_ref <- pi_theta, once the format warm-up is over."""

    def sync_due(self, step: int) -> bool:
        """Whether the reference follows the policy after ``step`` (every sync_every GRPO steps)."""
        grpo_steps = step - self.format_warmup_steps
        return self.kind != "none" and self.sync_every > 0 and grpo_steps > 0 and grpo_steps % self.sync_every == 0

    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """The reference follows the policy (``follow_policy_``)."""

    def saved_models(self) -> dict[str, torch.nn.Module]:
        """The models a checkpoint saves besides the policy, by name."""
        return {}

    def base_changed(self, step: int) -> bool:
        """Whether the weights besides the trainable ones differ from model.path at ``step``, so
        a checkpoint must hold them: without LoRA everything trains."""
        return True


class FrozenCopy(NoReference):
    """pi_ref is ``copy``, a frozen second model loaded from model.path."""

    kind = "copy"

    def __init__(self, copy: torch.nn.Module, policy: torch.nn.Module, alpha: float = 1.0, **schedule):
        super().__init__(**schedule)
        self.copy, self.pi, self.alpha = copy, policy, alpha

    @contextmanager
    def policy(self) -> Iterator[torch.nn.Module]:
        yield self.copy

    @torch.no_grad()
    def after_format_warmup(self) -> None:
        for ref_p, p in zip(self.copy.parameters(), self.pi.parameters()):
            ref_p.copy_(p)

    @torch.no_grad()
    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """pi_ref <- alpha pi_theta + (1 - alpha) pi_ref."""
        follow_policy_(self.copy.parameters(), self.pi.parameters(), self.alpha)

    def saved_models(self) -> dict[str, torch.nn.Module]:
        # After a format warm-up the copy is a snapshot of the policy, not the checkpoint on
        # disk, so it must be saved with the run to be restored; so must one that follows the policy.
        return {"reference": self.copy} if self.format_warmup_steps or self.sync_every else {}


class AdaptersOff(NoReference):
    """LoRA: pi_ref is the policy with its adapters off; the KL pass runs only with ``in_loss``
    (beta > 0). Snapshot and sync merge the adapters into the base weights and start fresh
    ones (B = 0): the model computes the same, and "adapters off" is then the current policy."""

    kind = "adapters_off"

    def __init__(self, policy: torch.nn.Module, seed: int, in_loss: bool, **schedule):
        super().__init__(**schedule)
        self.pi, self.seed, self.in_loss = policy, seed, in_loss

    @contextmanager
    def policy(self) -> Iterator[torch.nn.Module | None]:
        if not self.in_loss:
            yield None
            return
        with adapters_disabled(self.pi):
            yield self.pi

    @torch.no_grad()
    def after_format_warmup(self) -> None:
        merge_adapters_(self.pi, seed=self.seed)  # GRPO's adapters start again from B A = 0

    @torch.no_grad()
    def follow(self, optimizer: torch.optim.Optimizer) -> None:
        """Merge and start again (alpha is 1); the AdamW moments, which belonged to the merged
        adapters, are cleared."""
        merge_adapters_(self.pi, seed=self.seed)
        optimizer.state.clear()

    def base_changed(self, step: int) -> bool:
        """Once the format warm-up's adapters (or, following the policy, GRPO's) were merged."""
        w, every = self.format_warmup_steps, self.sync_every
        return 0 < w <= step or (every > 0 and w + every <= step)


def choose_reference(cfg, policy: torch.nn.Module, load_copy: Callable[[], torch.nn.Module],
                     format_warmup_steps: int) -> NoReference:
    """The run's reference, from the config: ``load_copy()`` builds the frozen copy when one is
    needed. format_warmup_steps: the format warm-up's length (0 for SFT)."""
    a = cfg.algorithm
    schedule = dict(format_warmup_steps=format_warmup_steps, sync_every=a.ref_sync_every if a.name == "grpo" else 0)
    if cfg.lora.enabled:
        return AdaptersOff(policy, cfg.run.seed, in_loss=reference_kind(cfg) == "adapters_off", **schedule)
    if reference_kind(cfg) == "copy":
        return FrozenCopy(load_copy(), policy, a.ref_sync_alpha, **schedule)
    return NoReference(**schedule)
