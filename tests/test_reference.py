"""The reference policy chosen once at set-up (grpo/reference.py) and the run state that
snapshots itself (grpo/runstate.py), without a model: tiny linear layers stand in."""

import random
from itertools import product
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.datasets import Sample
from grpo.reference import AdaptersOff, FrozenCopy, NoReference, choose_reference, reference_kind
from grpo.runstate import RunState
from grpo.stream import PromptStream


def config(name="grpo", beta=0.04, lora=False, sync_every=0, alpha=1.0):
    return SimpleNamespace(algorithm=SimpleNamespace(name=name, beta=beta, ref_sync_every=sync_every,
                                                     ref_sync_alpha=alpha),
                           lora=SimpleNamespace(enabled=lora), run=SimpleNamespace(seed=0))


def test_the_kind_follows_the_config():
    assert reference_kind(config(name="sft")) == "none"
    assert reference_kind(config(beta=0.0)) == "none"
    assert reference_kind(config(beta=0.0, lora=True)) == "none"
    assert reference_kind(config(lora=True)) == "adapters_off"
    assert reference_kind(config()) == "copy"


def test_choose_loads_a_copy_only_when_the_kl_needs_one():
    loads = []
    policy = torch.nn.Linear(2, 2)

    def load():
        loads.append(1)
        return torch.nn.Linear(2, 2)

    assert type(choose_reference(config(beta=0.0), policy, load, 0)) is NoReference
    lora = choose_reference(config(lora=True), policy, load, 0)
    assert type(lora) is AdaptersOff and lora.in_loss
    assert not choose_reference(config(lora=True, beta=0.0), policy, load, 0).in_loss  # merges, no KL pass
    assert loads == []
    copy = choose_reference(config(sync_every=2, alpha=0.5), policy, load, 3)
    assert type(copy) is FrozenCopy and loads == [1]
    assert (copy.format_warmup_steps, copy.sync_every, copy.alpha) == (3, 2, 0.5)
    assert choose_reference(config(name="sft", sync_every=2), policy, load, 0).sync_every == 0  # SFT never syncs


@pytest.mark.parametrize("warmup,every", list(product((0, 3), (0, 2))))
def test_the_schedule_what_is_saved_and_whether_the_base_changed(warmup, every):
    policy = torch.nn.Linear(2, 2)
    copy = FrozenCopy(torch.nn.Linear(2, 2), policy, format_warmup_steps=warmup, sync_every=every)
    lora = AdaptersOff(policy, 0, in_loss=True, format_warmup_steps=warmup, sync_every=every)
    none = NoReference(format_warmup_steps=warmup, sync_every=every)
    for step in range(12):
        grpo_steps = step - warmup
        due = every > 0 and grpo_steps > 0 and grpo_steps % every == 0
        assert copy.sync_due(step) == lora.sync_due(step) == due, step
        assert not none.sync_due(step)
        assert copy.base_changed(step) and none.base_changed(step)  # without LoRA everything trains
        assert lora.base_changed(step) == (0 < warmup <= step or (every > 0 and warmup + every <= step)), step
    assert set(copy.saved_models()) == ({"reference"} if warmup or every else set())
    assert lora.saved_models() == none.saved_models() == {}


def test_a_frozen_copy_snapshots_and_follows_the_policy():
    torch.manual_seed(0)
    policy, frozen = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    copy = FrozenCopy(frozen, policy, alpha=0.25)
    with copy.policy() as model:
        assert model is frozen
    copy.after_format_warmup()
    assert all(torch.equal(r, p) for r, p in zip(frozen.parameters(), policy.parameters()))
    before = [p.detach().clone() for p in frozen.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    copy.follow(torch.optim.SGD(policy.parameters(), lr=0.1))
    for r, b, p in zip(frozen.parameters(), before, policy.parameters()):
        torch.testing.assert_close(r, 0.25 * p + 0.75 * b)
    with NoReference().policy() as model:
        assert model is None


SAMPLES = [Sample(id=f"s{i}", audio_path=f"/clips/{i}.wav", question="?", choices=["a", "b"], answer="a", task=None)
           for i in range(7)]


def test_the_run_state_restores_the_step_counters_stream_and_rng():
    state = RunState(PromptStream(SAMPLES, lambda path: np.zeros(4, dtype=np.float32), seed=1))
    state.stream.take(3)
    state.step, state.counters.update, state.counters.applied_updates = 5, 4, 6
    snapshot = state.snapshot()
    expected = ([s.id for s in state.stream.take(5)[0]], torch.rand(2), np.random.rand(), random.random())
    state.step += 1
    state.counters.update, state.counters.applied_updates, state.counters.nonfinite_total = 9, 9, 1
    state.restore(snapshot)
    again = ([s.id for s in state.stream.take(5)[0]], torch.rand(2), np.random.rand(), random.random())
    assert again[0] == expected[0] and torch.equal(again[1], expected[1]) and again[2:] == expected[2:]
    assert (state.step, state.counters.update, state.counters.applied_updates, state.counters.nonfinite_total) \
        == (5, 4, 6, 0)
    saved, rank_state = state.saved(world=2)
    fresh = RunState(PromptStream(SAMPLES, lambda path: np.zeros(4, dtype=np.float32), seed=1))
    fresh.load({**saved, "step": state.step}, rank_state)
    assert (fresh.step, fresh.counters.update, fresh.stream.state_dict()) == (5, 4, state.stream.state_dict())
