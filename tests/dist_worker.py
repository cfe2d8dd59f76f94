"""Two-process checks of models/distributed.py, run by tests/test_distributed.py under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py \
        --checkpoint TINY_CHECKPOINT_DIR --out OUT_DIR [--scenarios grads,reference,...]

Every process runs on the CPU with gloo. Each rank builds the unsharded model too and computes
the single-process answer itself (the whole batch), so no second launch is needed. Each scenario
writes ``OUT_DIR/<scenario>.json`` from rank 0: ``{"ok": true, ...numbers}`` or
``{"ok": false, "error": traceback}``; the test reads those files. A scenario that hangs leaves
no file, and the test's timeout names it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import policy  # noqa: E402
from models.distributed import (  # noqa: E402
    cleanup,
    export_checkpoint,
    gathered_params,
    init_distributed,
    load_sharded,
    shard_model,
)
from models import distributed as D  # noqa: E402
from models.loading import end_token_ids, load_generation_config, load_model, load_processor  # noqa: E402

PROMPTS_PER_RANK = 2
GROUP = 2  # completions per prompt
COMPLETION_LEN = 6
QUESTIONS = [
    "What is the main sound source in the audio?",
    "Which animal makes the sound?",
    "How many times does the sound repeat? Please choose the answer from the following options.",
    "Is the pitch rising?",
]


# ----------------------------------------------------------------------------- inputs


def make_batch(processor, n_prompts: int, seed: int = 0) -> dict:
    """A left-padded batch of prompts with clips of different lengths (so the audio token
    counts and the prompt lengths differ)."""
    rng = np.random.default_rng(seed)
    texts, waves = [], []
    for i in range(n_prompts):
        messages = [{"role": "user", "content": [
            {"type": "audio", "audio_url": f"clip{i}.wav"},
            {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]},
        ]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        waves.append(rng.standard_normal(16000 * (1 + i % 3)).astype(np.float32) * 0.1)
    out = processor(text=texts, audio=waves, sampling_rate=16000, return_tensors="pt", padding=True)
    return {k: out[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}


def make_completions(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random completion ids [n, T] (plain BPE ids of the tiny tokenizer, no special token)
    and a mask that ends each row after a different number of tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (n, COMPLETION_LEN), generator=g)
    lengths = 1 + torch.arange(n) % COMPLETION_LEN
    mask = (torch.arange(COMPLETION_LEN)[None, :] < lengths[:, None]).float()
    return ids, mask


def select(batch: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in batch.items()}


def token_mean_loss(model, batch, ids, mask, advantages, total_tokens, shared_prefix=False) -> torch.Tensor:
    """A GRPO-like loss through the policy functions: sum over this part's completion tokens of
    -A * log pi, divided by the number of completion tokens of the *whole* batch.

    By default the plain path (the encoder over the whole window, each prompt through the
    decoder once per completion); ``shared_prefix``: the trainer's path (the encoder over the
    real frames, each prompt through the decoder once per group), which must give the same."""
    if shared_prefix:
        logp = policy.policy_logprobs(model, batch, ids, shared_prefix=True, real_frames=True)
    else:
        embeds = policy.prompt_embeddings(model, **policy.embedding_inputs(batch), real_frames=False)
        embeds = embeds.repeat_interleave(GROUP, dim=0)
        pmask = batch["attention_mask"].repeat_interleave(GROUP, dim=0)
        logp = policy.completion_logprobs(model, embeds, pmask, ids)
    return -(logp * advantages[:, None] * mask).sum() / total_tokens


def full_grads(model) -> dict[str, torch.Tensor]:
    """Parameter name -> the full gradient (DTensor shards gathered; a collective)."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name.replace("_checkpoint_wrapped_module.", "")] = g.detach().clone()
    return out


def full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name.replace("_checkpoint_wrapped_module.", "")] = t.detach().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def max_rel_diff(a: dict, b: dict) -> float:
    """max |a - b| / (max |b| + 1e-12) per tensor, then the max over tensors."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in a)


# ----------------------------------------------------------------------------- scenarios


class CollectiveCounter:
    """Counts calls of one kind of torch.distributed collective. FSDP2 looks its collectives up
    on the module at each call, under names that depend on the torch release: to unshard,
    ``all_gather_into_tensor`` (torch 2.11, 2.12) or ``all_gather_single`` (2.13 on); for
    gradients, ``reduce_scatter_tensor`` or ``reduce_scatter_single``. Every name present is counted."""

    NAMES = {"all_gather": ("all_gather_into_tensor", "all_gather_single"),
             "reduce_scatter": ("reduce_scatter_tensor", "reduce_scatter_single")}

    def __init__(self, kind: str):
        self.count = 0
        self._originals = {name: getattr(dist, name) for name in self.NAMES[kind] if hasattr(dist, name)}

    def __enter__(self):
        def counting(original):
            def call(*args, **kwargs):
                self.count += 1
                return original(*args, **kwargs)
            return call

        for name, original in self._originals.items():
            setattr(dist, name, counting(original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


class CollectiveLog:
    """Records every torch.distributed collective this rank issues inside the block, in order:
    (name, number of elements of its first tensor). Ranks that record different sequences
    issued different collectives: gloo may fail or hang on that, NCCL may pair one rank's
    all-gather with another rank's collective of the same size and go on with mixed data.
    Nested calls (``all_gather_object``'s own all-gathers) are recorded too, the same on
    every rank. Functional collectives (DTensor's) bypass these names and are not seen."""

    NAMES = ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single",
             "all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all_single", "barrier",
             "all_gather_object", "broadcast_object_list")

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self._originals = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    @staticmethod
    def _numel(args) -> int:
        for a in args:
            if isinstance(a, torch.Tensor):
                return a.numel()
            if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                return sum(t.numel() for t in a)
        return -1

    def __enter__(self):
        def recording(name, original):
            def call(*args, **kwargs):
                self.calls.append((name, self._numel(args)))
                return original(*args, **kwargs)
            return call

        for name, original in self._originals.items():
            setattr(dist, name, recording(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def compare_collectives(sequences: list[list]) -> dict:
    """Every rank's recorded sequence -> {"counts": [per rank], "same": bool, "first_difference": index}."""
    counts = [len(s) for s in sequences]
    same = all(list(map(tuple, s)) == list(map(tuple, sequences[0])) for s in sequences)
    first = None
    if not same:
        first = next((i for i in range(max(counts))
                      if len({tuple(s[i]) if i < len(s) else None for s in sequences}) > 1), None)
    return {"counts": counts, "same": same, "first_difference": first}


class Env:
    """What every scenario needs: the checkpoint, the processor, the whole batch."""

    def __init__(self, checkpoint: str, out: Path):
        self.checkpoint, self.out = checkpoint, out
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.processor = load_processor(checkpoint)
        self.generation_config = load_generation_config(checkpoint)
        n = PROMPTS_PER_RANK * self.world
        self.batch = make_batch(self.processor, n)
        self.ids, self.mask = make_completions(n * GROUP)
        self.adv = torch.linspace(-1.0, 1.0, n * GROUP)
        self.total_tokens = self.mask.sum()
        # this rank's share: its prompts and their G completions each
        lo, hi = self.rank * PROMPTS_PER_RANK, (self.rank + 1) * PROMPTS_PER_RANK
        self.local_batch = select(self.batch, lo, hi)
        c = slice(lo * GROUP, hi * GROUP)
        self.local_ids, self.local_mask, self.local_adv = self.ids[c], self.mask[c], self.adv[c]

    def load(self):
        model = load_model(self.checkpoint, dtype=torch.float32, device="cpu")
        policy.set_trainable(model)  # as the trainer does: the encoder's position table is frozen
        return model

    def reference_grads(self) -> dict:
        """The single-process gradient of the whole batch's loss."""
        model = self.load()
        token_mean_loss(model, self.batch, self.ids, self.mask, self.adv, self.total_tokens).backward()
        return full_grads(model)


def scenario_grads(env: Env) -> dict:
    """(a) Sharded forward + backward on half the batch per rank == the whole-batch gradient,
    for mean and sum reduction, with activation checkpointing, with gradient accumulation,
    and through the shared-prefix path (plain and with checkpointing)."""
    expected = env.reference_grads()
    results = {}
    variants = {
        "mean": dict(grad_reduce="mean"),
        "sum": dict(grad_reduce="sum"),
        "checkpointing": dict(grad_reduce="mean", activation_checkpointing=True),
        "no_reshard": dict(grad_reduce="mean", reshard_after_forward=False),
        "accumulation": dict(grad_reduce="mean"),
        "shared_prefix": dict(grad_reduce="mean"),
        "shared_prefix_checkpointing": dict(grad_reduce="mean", activation_checkpointing=True),
    }
    for name, kwargs in variants.items():
        model = shard_model(env.load(), **kwargs)
        shared = name.startswith("shared_prefix")
        scale = env.world if kwargs["grad_reduce"] == "mean" else 1.0
        if name == "accumulation":
            # one prompt per micro-batch, each reduce-scattering; the shards accumulate
            reduce_scatters = []
            for i in range(PROMPTS_PER_RANK):
                c = slice(i * GROUP, (i + 1) * GROUP)
                with CollectiveCounter("reduce_scatter") as counter:
                    loss = token_mean_loss(model, select(env.local_batch, i, i + 1), env.local_ids[c],
                                           env.local_mask[c], env.local_adv[c], env.total_tokens)
                    (loss * scale).backward()
                reduce_scatters.append(counter.count)
            results["accumulation_reduce_scatters"] = reduce_scatters
        else:
            loss = token_mean_loss(model, env.local_batch, env.local_ids, env.local_mask, env.local_adv,
                                   env.total_tokens, shared_prefix=shared)
            (loss * scale).backward()
        got = full_grads(model)
        results[name] = {"max_abs": max_diff(got, expected), "max_rel": max_rel_diff(got, expected)}
    results["n_params_with_grad"] = len(expected)
    return results


def scenario_reference(env: Env) -> dict:
    """(d) A frozen reference sharded the same way: same log-probs as the policy at init, no grads."""
    policy_model = shard_model(env.load())
    reference = shard_model(env.load(), frozen=True)
    inputs = policy.embedding_inputs(env.local_batch)
    embeds = policy.prompt_embeddings(policy_model, **inputs).repeat_interleave(GROUP, dim=0)
    pmask = env.local_batch["attention_mask"].repeat_interleave(GROUP, dim=0)
    logp = policy.completion_logprobs(policy_model, embeds, pmask, env.local_ids)
    with torch.no_grad():
        ref_embeds = policy.prompt_embeddings(reference, **inputs).repeat_interleave(GROUP, dim=0)
        ref_logp = policy.completion_logprobs(reference, ref_embeds, pmask, env.local_ids)
    (-(logp * env.local_mask).sum()).backward()
    return {
        "logp_max_abs": float((logp.detach() - ref_logp).abs().max()),
        "ref_requires_grad": any(p.requires_grad for p in reference.parameters()),
        "ref_has_grad": any(p.grad is not None for p in reference.parameters()),
        "ref_training": any(m.training for m in reference.modules()),
        "policy_has_grad": all(p.grad is not None for p in policy_model.parameters() if p.requires_grad),
    }


def _train_steps(model, env: Env, local: bool, steps: int = 2) -> list[float]:
    """AdamW steps with clipping; returns the pre-clip gradient norms."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-6)
    norms = []
    for _ in range(steps):
        if local:
            loss = token_mean_loss(model, env.local_batch, env.local_ids, env.local_mask, env.local_adv,
                                   env.total_tokens) * env.world
        else:
            loss = token_mean_loss(model, env.batch, env.ids, env.mask, env.adv, env.total_tokens)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        norms.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def scenario_optimizer(env: Env) -> dict:
    """(e) Two clipped AdamW steps on the sharded model == two on the single-process model;
    the same with CPU offload of the sharded parameters."""
    single = env.load()
    single_norms = _train_steps(single, env, local=False)
    expected = full_params(single)
    results = {"single_norms": single_norms}
    for name, kwargs in {"sharded": {}, "cpu_offload": {"cpu_offload": True}}.items():
        model = shard_model(env.load(), **kwargs)
        norms = _train_steps(model, env, local=True)
        results[name] = {
            "norms": norms,
            "param_max_abs": max_diff(full_params(model), expected),
        }
    return results


def scenario_export(env: Env) -> dict:
    """(c) Export from the 2-rank sharded model; from_pretrained + AutoProcessor read back the
    same parameters and a processor that renders and tokenizes the same."""
    import transformers
    from transformers import AutoProcessor

    model = env.load()
    plain = getattr(transformers, type(model).__name__)  # the family's own class, before FSDP renames it
    # move the weights away from the checkpoint's, identically on every rank
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    expected = full_params(model)
    model = shard_model(model, activation_checkpointing=True)  # the wrapper prefix must not leak
    out_dir = env.out / "export"
    export_checkpoint(model, env.processor, env.generation_config, out_dir)
    # the sharded model still trains after the export (it did not disturb the FSDP state)
    token_mean_loss(model, env.local_batch, env.local_ids, env.local_mask, env.local_adv,
                    env.total_tokens).backward()
    if env.rank != 0:
        return {}

    reloaded = plain.from_pretrained(out_dir, local_files_only=True)
    got = {n: p.detach() for n, p in reloaded.named_parameters()}
    processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                              {"type": "text", "text": QUESTIONS[0]}]}]
    text_a = env.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text_b = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    wave = np.random.default_rng(0).standard_normal(24000).astype(np.float32) * 0.1
    inputs_a = env.processor(text=[text_a], audio=[wave], sampling_rate=16000, return_tensors="pt")
    inputs_b = processor(text=[text_b], audio=[wave], sampling_rate=16000, return_tensors="pt")
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".")]
    return {
        "param_max_abs": max_diff(got, expected),
        "dtype": str(next(reloaded.parameters()).dtype),
        "same_text": text_a == text_b,
        "same_inputs": sorted(inputs_a) == sorted(inputs_b)
        and all(torch.equal(inputs_a[k], inputs_b[k]) for k in inputs_a),
        "processor_class": type(processor).__name__,
        "leftover_tmp_dirs": leftovers,
    }


def scenario_generation(env: Env) -> dict:
    """(b) Generation under sharding with completions of different lengths on the two ranks:
    rank 0 runs to max_new_tokens, rank 1 ends after its first token. Inside gathered_params
    no rank waits for another and no all-gather happens per token; with sync_ranks=True and
    per-layer all-gathers (outside gathered_params) the ranks stay in lockstep."""
    model = shard_model(env.load())
    model.eval()
    tokenizer = env.processor.tokenizer
    suppress = policy.suppressed_token_ids(tokenizer)
    pad = env.generation_config.pad_token_id
    max_new = 8
    results = {}
    with torch.no_grad():
        embeds = policy.prompt_embeddings(model, **policy.embedding_inputs(env.local_batch))
        pmask = env.local_batch["attention_mask"]

        def run(end_ids, sync):
            return policy.generate(model, embeds, pmask, max_new_tokens=max_new, end_token_ids=end_ids,
                                   pad_token_id=pad, suppress_token_ids=suppress, greedy=True, sync_ranks=sync)

        with gathered_params(model):
            # the greedy first tokens, to make rank 1 end on them at step 1
            first = run(end_token_ids(env.generation_config), False)[:, 0].tolist()
            # rank 0 ends only on <|AUDIO|>, which is never sampled: it reaches max_new_tokens
            audio_id = tokenizer.convert_tokens_to_ids("<|AUDIO|>")
            end_ids = [audio_id] if env.rank == 0 else sorted(set(first))
            with CollectiveCounter("all_gather") as counter:
                ids = run(end_ids, False)
            results["inside"] = {"width": ids.shape[1], "all_gathers": counter.count}

        with CollectiveCounter("all_gather") as counter:
            ids = run(end_ids, True)
        results["sync_ranks"] = {"width": ids.shape[1], "all_gathers": counter.count,
                                 "padded_after_first": bool((ids[:, 1:] == pad).all())}

    # FSDP is back to normal: a training forward + backward still gives the right gradient
    model.train()
    loss = token_mean_loss(model, env.local_batch, env.local_ids, env.local_mask, env.local_adv,
                           env.total_tokens)
    (loss * env.world).backward()
    results["grads_after_max_abs"] = max_diff(full_grads(model), env.reference_grads())

    # gather every rank's numbers onto rank 0
    gathered = [None] * env.world
    dist.all_gather_object(gathered, results)
    return {"ranks": gathered}


def scenario_update_straddle(env: Env) -> dict:
    """The real ``grpo.step.policy_update`` on 2 sharded ranks whose loss tokens straddle the
    lm_head chunk: rank 0's completions end within 2 tokens, rank 1's run all 6, with a chunk
    of 8 rows and 2 rows per micro-batch (4 rows against 12 if each rank kept its own width:
    1 chunk against 2, one lm_head all-gather more on rank 1). Two updates; each update's
    collectives are recorded on every rank and compared on rank 0."""
    from grpo.config import Config, advantage_spec, correction_spec, loss_spec
    from grpo.reference import NoReference
    from grpo.step import Counters, StepContext, StepSettings, Trajectory, policy_update

    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step = GROUP, PROMPTS_PER_RANK * env.world
    cfg.algorithm.micro_batch_prompts, cfg.algorithm.mu, cfg.algorithm.beta = 1, 1, 0.0
    cfg.model.logprob_chunk_rows = 8
    cfg.optimizer.lr, cfg.optimizer.warmup_steps = 1e-3, 0
    model = shard_model(env.load())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = StepContext(StepSettings.from_config(cfg), model, NoReference(), optimizer, processor=None, sampling=None,
                      stream=None, device=torch.device("cpu"), total_updates=2, loss=loss_spec(cfg),
                      advantage=advantage_spec(cfg), correction=correction_spec(cfg),
                      rank=env.rank, world=env.world, fsdp=True)
    T = env.local_ids.shape[1]
    last = 2 if env.rank == 0 else T  # loss tokens end by column 2 on rank 0, run to T on rank 1
    mask = (torch.arange(T)[None, :] < torch.tensor([1, last] * PROMPTS_PER_RANK)[:, None])  # [n, T]
    total = torch.tensor([int(mask.sum())])
    dist.all_reduce(total)
    traj = Trajectory([None] * PROMPTS_PER_RANK, env.local_batch, env.local_ids, mask, env.local_adv, None, None,
                      int(total))
    steps, counters = [], Counters()
    for _ in range(2):
        with CollectiveLog() as log:
            record = policy_update(ctx, counters, traj)
        steps.append(log.calls)
    every = [None] * env.world
    dist.all_gather_object(every, steps)
    return {"steps": [compare_collectives([rank_steps[i] for rank_steps in every]) for i in range(len(steps))],
            "losses_finite": bool(np.isfinite(record.losses).all()), "updates": counters.update}


def scenario_static_decoding(env: Env) -> dict:
    """(f) The static-cache decoder under sharding, sampled with counter-based row seeds and
    ragged ends (rank 1's rows end sooner than rank 0's): the dynamic decoder's tokens and
    log-probs on every rank, the same number of decoder forwards on both ranks (lockstep), and
    the unsharded model's completions of the whole batch."""
    from models.sampling import row_seed

    def ragged_ends(model, end_id, modulus):
        def hook(module, args, out):
            top = out.max(-1, keepdim=True)
            ending = top.indices % modulus == 0
            return torch.where(ending & (torch.arange(out.shape[-1]) == end_id), top.values + 1.0, out)
        return model.lm_head.register_forward_hook(hook)

    tokenizer = env.processor.tokenizer
    ends = end_token_ids(env.generation_config)
    kw = dict(max_new_tokens=10, end_token_ids=ends, pad_token_id=env.generation_config.pad_token_id,
              suppress_token_ids=policy.suppressed_token_ids(tokenizer), temperature=1.0, top_k=50,
              group_size=GROUP, return_logprobs=True)
    n = PROMPTS_PER_RANK * env.world
    seeds = torch.tensor([row_seed(11, i) for i in range(n * GROUP)])
    lo = env.rank * PROMPTS_PER_RANK * GROUP
    local_seeds = seeds[lo:lo + PROMPTS_PER_RANK * GROUP]

    # the unsharded model, the whole batch, each rank's prompts under that rank's end rule
    plain = env.load().eval()
    with torch.no_grad():
        whole = []
        for r in range(env.world):
            part = select(env.batch, r * PROMPTS_PER_RANK, (r + 1) * PROMPTS_PER_RANK)
            hook = ragged_ends(plain, ends[0], modulus=3 - r)
            embeds = policy.prompt_embeddings(plain, **policy.embedding_inputs(part))
            rows = slice(r * PROMPTS_PER_RANK * GROUP, (r + 1) * PROMPTS_PER_RANK * GROUP)
            whole.append(policy.generate(plain, embeds, part["attention_mask"], **kw, row_seeds=seeds[rows],
                                         decoder="dynamic")[0])
            hook.remove()
    model = shard_model(env.load())
    model.eval()
    hook = ragged_ends(model, ends[0], modulus=3 - env.rank)
    calls = []
    counter = policy.text_decoder(model).register_forward_pre_hook(lambda m, a: calls.append(1))
    out = {}
    with torch.no_grad():
        embeds = policy.prompt_embeddings(model, **policy.embedding_inputs(env.local_batch))
        for decoder in ("dynamic", "static"):
            calls.clear()
            ids, logp = policy.generate(model, embeds, env.local_batch["attention_mask"], **kw,
                                        row_seeds=local_seeds, sync_ranks=True, decoder=decoder)
            out[decoder] = (ids, logp, len(calls))
    hook.remove(), counter.remove()
    (ids_d, lp_d, calls_d), (ids_s, lp_s, calls_s) = out["dynamic"], out["static"]
    reference = whole[env.rank]
    T = min(reference.shape[1], ids_s.shape[1])
    result = {"same_tokens": bool(torch.equal(ids_d, ids_s)), "width": ids_s.shape[1],
              "logp_max_abs": (lp_d - lp_s).abs().max().item(), "forwards": [calls_d, calls_s],
              "same_as_unsharded": bool(torch.equal(ids_s[:, :T], reference[:, :T])),
              "ended_rows": int(torch.isin(ids_s, torch.tensor(ends)).any(-1).sum())}
    gathered = [None] * env.world
    dist.all_gather_object(gathered, result)
    return {"ranks": gathered}


def scenario_meta_load(env: Env) -> dict:
    """Built on the meta device, each rank reading only its shards from the file: the same
    sharded model as loading it whole and sharding it, bit for bit (the gathered state dict,
    each rank's local shards, the buffers, which parameters train), for the policy, the frozen
    reference and the checkpoint-wrapped policy."""
    variants = {"policy": dict(), "reference": dict(frozen=True),
                "checkpointing": dict(activation_checkpointing=True)}
    results = {}
    for name, kwargs in variants.items():
        old = shard_model(env.load(), **kwargs)
        new = load_sharded(env.checkpoint, prepare=policy.set_trainable, **kwargs)
        local = {}
        for (n_old, p_old), (n_new, p_new) in zip(old.named_parameters(), new.named_parameters()):
            local[n_old] = (n_old == n_new and p_old.requires_grad == p_new.requires_grad
                            and isinstance(p_new, DTensor) and p_old.placements == p_new.placements
                            and torch.equal(p_old.to_local(), p_new.to_local()))
        buffers = {n: torch.equal(b_old, b_new) for (n, b_old), (_, b_new)
                   in zip(old.named_buffers(), new.named_buffers())}
        full_old, full_new = D.full_state_dict(old), D.full_state_dict(new)  # rank 0 only
        every = [None] * env.world
        dist.all_gather_object(every, {"local_unequal": [n for n, ok in local.items() if not ok],
                                       "n_local": len(local), "buffers_unequal": [n for n, ok in buffers.items() if not ok],
                                       "n_buffers": len(buffers), "meta_left": any(p.is_meta for p in new.parameters())})
        results[name] = {
            "ranks": every,
            "same_keys": sorted(full_old) == sorted(full_new),
            "full_unequal": [k for k in full_old if k not in full_new or not torch.equal(full_old[k], full_new[k])],
            "n_full": len(full_old),
            "training": [old.training, new.training],
        }
    results["fallbacks"] = sorted(D._FALLBACKS_LOGGED)
    return results


SCENARIOS = {
    "grads": scenario_grads,
    "reference": scenario_reference,
    "optimizer": scenario_optimizer,
    "export": scenario_export,
    "static_decoding": scenario_static_decoding,
    "generation": scenario_generation,  # the one that could hang in decoding
    "meta_load": scenario_meta_load,
    "update_straddle": scenario_update_straddle,  # last: the one that fails or hangs if the widths disagree
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # two processes share two cores with other work

    start = time.perf_counter()
    # a bounded collective timeout: ranks that disagree on a collective fail within it, not in 30 min
    info = init_distributed(device="cpu", timeout_s=float(os.environ.get("DIST_WORKER_TIMEOUT_S", "90")))
    out = Path(args.out)
    env = Env(args.checkpoint, out)
    if info.rank == 0:
        (out / "setup.json").write_text(json.dumps({"seconds": round(time.perf_counter() - start, 2)}))
    for name in args.scenarios.split(","):
        start = time.perf_counter()
        try:
            torch.manual_seed(0)
            with CollectiveLog() as log:
                result = {"ok": True, **SCENARIOS[name](env)}
        except Exception:  # report, and let the other scenarios run
            result = {"ok": False, "error": traceback.format_exc()}
        # the invariant of every scenario: each rank issued the same collectives in the same order
        try:
            every = [None] * env.world
            dist.all_gather_object(every, log.calls if result["ok"] else None)
            if all(calls is not None for calls in every):
                result["collectives"] = compare_collectives(every)
        except Exception:  # the group broke in the scenario: its own error says why
            result["ok"], result["error"] = False, result.get("error") or traceback.format_exc()
        result["seconds"] = round(time.perf_counter() - start, 2)
        # every rank's failure matters: rank 0 writes the file, the others their own error file
        if info.rank == 0:
            (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        elif not result["ok"]:
            (out / f"{name}.rank{info.rank}.json").write_text(json.dumps(result, indent=2))
    # the process group must be gone before the interpreter exits: count the gloo worker threads
    # (torch names them) before and after cleanup(), on every rank
    before = gloo_worker_threads()
    cleanup()
    (out / f"shutdown.threads.rank{info.rank}.json").write_text(
        json.dumps({"before": before, "after": gloo_worker_threads()}))


def gloo_worker_threads() -> int:
    """How many of this process's threads are gloo's collective workers (Linux: /proc)."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sum(name == "pt_gloo_runloop" for name in names)


if __name__ == "__main__":
    main()
