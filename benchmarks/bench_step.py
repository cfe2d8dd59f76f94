"""Time one GRPO step, ours against a naive transformers-style trainer.

The goal: ours at least 3x faster per step than naive at R1-AQA's shape on GPU.

Each step is the trainer's own step, ``grpo.step.rollout`` then ``grpo.step.policy_update``
(the same advantages, micro-batches, loss share, backward, clip and optimizer step); a mode
gives it its pieces: how it samples the benchmark's fixed prompts (``StepContext.rounds_from``)
and how it computes log-probs (``StepContext.logprobs``). Five phases, timed separately:

    rollout           B prompts x G completions x T new tokens (no gradients)
    reference         log pi_ref of the completions, no gradients (only when algorithm.beta > 0)
    old_logprobs      log pi_old of the completions, no gradients (only when algorithm.mu > 1)
    forward_backward  log pi_theta with gradients, the GRPO loss, backward (micro-batch by
                      micro-batch; mu passes)
    optimizer         the optimizer step (mu of them; the gradient-norm clip counts in forward_backward)

Settings come from a training config (`--config FILE section.key=value ...`, read by
grpo.config.load_config): the model (model.path, built when model.build_tiny and absent),
B = rollout.prompts_per_step (all on this one process), rollout.group_size,
rollout.max_new_tokens, rollout.temperature/top_k/top_p, rollout.generation_batch_prompts,
algorithm.beta/mu/loss_type/kl_estimator/eps_low/eps_high/importance_level/
micro_batch_prompts, optimizer.lr/betas/adam_eps/weight_decay/max_grad_norm,
model.dtype/attn_implementation, distribution.activation_checkpointing/cpu_offload.
Without --config the benchmark's own defaults apply (B=2, G=4, T=16, R1-AQA's sampling and
loss, one micro-batch); `--model tiny|anchor|small|7b-random|PATH` picks the model either way
and the flags --prompts/--group-size/--new-tokens/--beta/--dtype are shorthands for overrides.

Both modes run the same prompts, completions' length, sampling settings, rewards, loss,
micro-batches and optimizer; they differ only in how they call the model:

    phase        naive (what R1-AQA's TRL fork does)                  ours (the trainer's path)
    -----------  ---------------------------------------------------  -------------------------------------
    rollout      model.generate on the G-times repeated inputs:       grpo.rollout.sample_completions:
                 every copy of a clip goes through the encoder and    each clip encoded once, each prompt
                 every copy of the prompt is prefilled                prefilled once and its KV cache
                                                                      repeated G times, counter-based sampling
    log-probs    model(**inputs) on the G-times repeated inputs,      models.policy.policy_logprobs: each clip
                 logits [N, P+T, V] in fp32, log_softmax over the     once, over its real frames; each prompt
                 whole sequence, then the completion columns kept     through the decoder once per group; logits
                                                                      only at completion positions, in chunks;
                                                                      with the entropy, as the trainer logs it

Fixed completion length: both modes suppress the end tokens (ours: added to the suppressed ids;
naive: generate's `suppress_tokens`), so every completion is exactly T tokens long and both
modes do the same useful work (a random model would otherwise stop at random lengths).

Rewards are random 0/1 (fixed seed): the benchmark times the model, not the reward functions.
The reference and old-policy passes reuse the policy's weights under no_grad: the same compute
as a frozen copy, without a second copy in memory. With --mode both the two modes alternate
step by step (after a warm-up of each) and share one optimizer, so that a change of load on
the machine hits both alike.

Memory: on CUDA the peak of torch.cuda.max_memory_allocated within each phase (weights, gradients
and optimizer state included). On CPU the peak resident set size (VmHWM of /proc/self/status,
reset at each phase start through /proc/self/clear_refs after malloc_trim; the whole process,
libraries included); where that reset is not allowed, resource.getrusage's ru_maxrss, which
never goes down, so later phases report at least the earlier peaks.
The peaks come from one extra step of each mode after the timed ones: resetting a peak (a
gc.collect and malloc_trim on the CPU) inside the production step's timed regions would add
its own cost to the phase it falls in, so the timed steps carry no memory probe at all.

--cpu-offload (or distribution.cpu_offload: true): the optimizer's state and the copy of the
parameters it updates live on the CPU; after backward the gradients go to the CPU, the
optimizer steps there, the new weights come back (ZeRO-Offload's split, on one process). The
trainer's FSDP offload also keeps the parameters on the CPU between uses; that needs FSDP and
is not what this flag measures.

Models: tiny (the test model), small (~33M params), anchor (the 5.4M CPU shape R1-AQA's own
trainer was timed on, docs/FACTS.md),
7b-random (Qwen2-Audio-7B's architecture, configs/qwen2_audio_7b_random.yaml, GPU only), or a
checkpoint directory. Results and commands: benchmarks/RESULTS.md.

    python -m benchmarks.bench_step --model anchor --mode ablation --prompts 2 --group-size 8 \
        --new-tokens 32 --repeats 3 --threads 1 --json runs/bench_anchor.json
    python -m benchmarks.bench_step --config configs/tiny.yaml rollout.prompts_per_step=2

--mode ablation alternates five modes step by step: ours (the trainer's defaults), per_row
(the trainer with both exact savings off: the encoder over the whole window, each prompt
through the decoder once per completion, as before they existed), real_frames and
shared_prefix (one saving each), and naive.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from data.datasets import Sample
from grpo.algorithm import LossSpec, completion_mask, group_advantages, policy_loss
from grpo.reference import FrozenCopy, NoReference
from grpo.step import Counters, Round, StepContext, StepSettings, policy_update, rollout
from grpo.config import Config, advantage_spec, correction_spec, load_config, loss_spec, to_dict
from grpo.rollout import SamplingSettings, completion_seeds, prompt_batch, sample_completions, slice_prompts
from models.loading import (enable_activation_checkpointing, end_token_ids, load_generation_config, load_model,
                            load_processor, resolve_dtype)
from models.policy import audio_output_lengths, policy_logprobs, suppressed_token_ids

ROOT = Path(__file__).resolve().parents[1]

CONFIG_7B = ROOT / "configs" / "qwen2_audio_7b_random.yaml"

# Random models built by build_tiny_checkpoint. `small` is big enough that per-token Python
# overheads do not dominate, with the real 30 s audio window (the encoder always runs 1500
# positions) and a vocabulary much larger than its tokenizer (unused ids suppressed).
BUILT_MODELS = {
    "tiny": dict(),  # the test model: hidden 64, 2 + 2 layers, 3 s window, vocab 512 (~257k params)
    "small": dict(text_hidden=512, text_layers=8, audio_hidden=384, audio_layers=4, vocab_size=8192,
                  audio_seconds=30),  # ~33M params
    # the CPU anchor (docs/FACTS.md), on which R1-AQA's own trainer took 10.4 s per step (2 prompts x 8 x 32
    # tokens, beta 0.04): hidden 256, 4 + 4 layers, 30 s window, ~5.4M params
    "anchor": dict(text_hidden=256, text_layers=4, audio_hidden=256, audio_layers=4, audio_seconds=30),
}

# The benchmark's settings when no --config is given: R1-AQA's sampling (temperature
# 1.0, top-k 50, top-p 1.0), loss, beta and lr, at a CPU-sized shape, in one micro-batch.
BENCH_DEFAULTS = [
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=16",
    "rollout.temperature=1.0", "rollout.top_k=50", "rollout.top_p=1.0",
    "algorithm.beta=0.04", "algorithm.mu=1", "algorithm.loss_type=grpo", "optimizer.lr=1e-6",
]
QUESTIONS = [
    ("What is the main sound source in the audio?", ["dog", "cat", "bird", "car"]),
    ("Is the pitch of the tone rising or falling?", ["rising", "falling", "steady"]),
    ("How many times does the sound repeat?", ["one", "two", "three", "four"]),
    ("Which tone is louder, the first or the second?", ["first", "second"]),
]
PHASES = ("rollout", "reference", "old_logprobs", "forward_backward", "optimizer")


# --------------------------------------------------------------------------- models and prompts


class Setup:
    """What a step needs: the model, the prompts on the device, the sampling settings."""

    def __init__(self, model, prompts, settings, description):
        self.model, self.prompts, self.settings, self.description = model, prompts, settings, description


def tone_clips(n, seconds, sr=16000):
    """n decaying sine tones [S] float32: the audio content does not matter for timing."""
    t = np.arange(int(seconds * sr)) / sr
    return [(0.3 * np.sin(2 * np.pi * (220 * (i + 1)) * t) * np.exp(-t / seconds)).astype(np.float32)
            for i in range(n)]


def fixed_length_settings(new_tokens, ends, pad_id, suppress, *, temperature=1.0, top_k=50, top_p=1.0):
    """The sampling settings with the end tokens suppressed too: every completion runs to new_tokens."""
    return SamplingSettings(max_new_tokens=new_tokens, end_token_ids=list(ends), pad_token_id=pad_id,
                            suppress_token_ids=sorted(set(suppress) | set(ends)), temperature=temperature,
                            top_k=top_k, top_p=top_p)


def checkpoint_setup(path, name, *, n_prompts, clip_seconds, device, dtype, new_tokens, temperature=1.0,
                     top_k=50, top_p=1.0, template=2, attn_implementation="sdpa"):
    """A checkpoint directory (tiny, small or a real one): prompts through the real processor."""
    model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    processor = load_processor(path)
    gen = load_generation_config(path)
    ends = end_token_ids(gen)
    window = processor.feature_extractor.chunk_length
    clip_seconds = min(clip_seconds, window)
    samples = [Sample(id=f"bench-{i}", audio_path="", question=q, choices=c, answer=c[0], task=None, meta={})
               for i, (q, c) in enumerate(QUESTIONS[i % len(QUESTIONS)] for i in range(n_prompts))]
    prompts = prompt_batch(samples, tone_clips(n_prompts, clip_seconds), processor, template=template, device=device)
    vocab = model.config.text_config.vocab_size
    settings = fixed_length_settings(
        new_tokens, ends, gen.pad_token_id if gen.pad_token_id is not None else ends[-1],
        # ids the tokenizer does not have (small's vocabulary is padded) are never sampled either
        suppressed_token_ids(processor.tokenizer, vocab_size=vocab),
        temperature=temperature, top_k=top_k, top_p=top_p)
    return Setup(model, prompts, settings, f"{name} ({clip_seconds:g} s clips, {window} s window)")


def random_7b_setup(*, n_prompts, clip_seconds, device, dtype, new_tokens, temperature=1.0, top_k=50, top_p=1.0,
                    template=2, attn_implementation="sdpa"):
    """Qwen2-Audio-7B's architecture with random weights, built on the GPU (no tokenizer: the prompts'
    token ids are built by hand with the chat template's structure)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    spec = yaml.safe_load(CONFIG_7B.read_text())
    config = Qwen2AudioConfig(audio_config=spec["audio_config"], text_config=spec["text_config"],
                              audio_token_index=spec["audio_token_id"])
    config._attn_implementation = attn_implementation
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 directly: an fp32 8B model would need 33 GB
    try:
        with torch.device(device):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)

    ids = spec["special_tokens"]
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, ids["endoftext"], (n,), generator=gen).tolist()  # noqa: E731
    n_audio = int(audio_output_lengths(torch.tensor(int(clip_seconds * 100)))[1])  # 25 tokens per second
    rows = []
    for i in range(n_prompts):
        # system line, "Audio 1: <|audio_bos|><|AUDIO|>...<|audio_eos|>", the question (~60 tokens
        # for prompt <2>, a little shorter for some), then the assistant header
        rows.append([ids["im_start"], *text(8), ids["im_end"], *text(1), ids["im_start"], *text(4),
                     ids["audio_bos"], *[ids["audio"]] * n_audio, ids["audio_eos"], *text(60 - 3 * i % 9),
                     ids["im_end"], *text(1), ids["im_start"], *text(2)])
    P = max(len(r) for r in rows)
    input_ids = torch.full((n_prompts, P), spec["pad_token_id"], dtype=torch.long)
    attention_mask = torch.zeros(n_prompts, P, dtype=torch.long)
    for i, r in enumerate(rows):  # left padded, as collate_prompts does
        input_ids[i, P - len(r):], attention_mask[i, P - len(r):] = torch.tensor(r), 1
    frames = 2 * spec["audio_config"]["max_source_positions"]  # the 30 s window: 3000 mel frames
    features = torch.randn(n_prompts, spec["audio_config"]["num_mel_bins"], frames, generator=gen)
    feature_mask = (torch.arange(frames)[None, :] < int(clip_seconds * 100)).long().expand(n_prompts, -1)
    prompts = {"input_ids": input_ids, "attention_mask": attention_mask, "input_features": features,
               "feature_attention_mask": feature_mask.contiguous()}
    prompts = {k: v.to(device) for k, v in prompts.items()}
    suppress = [ids[k] for k in ("audio", "audio_bos", "audio_eos", "im_start")]
    settings = fixed_length_settings(new_tokens, spec["end_token_ids"], spec["pad_token_id"], suppress,
                                     temperature=temperature, top_k=top_k, top_p=top_p)
    return Setup(model, prompts, settings, f"Qwen2-Audio-7B architecture, random weights ({clip_seconds:g} s clips)")


def build_setup(model_name, cfg: Config, args, device, dtype, tmp):
    r = cfg.rollout
    common = dict(n_prompts=r.prompts_per_step, clip_seconds=args.clip_seconds, device=device, dtype=dtype,
                  new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                  template=cfg.data.prompt_template, attn_implementation=cfg.model.attn_implementation)
    if model_name == "7b-random":
        if device.type != "cuda":
            raise SystemExit("--model 7b-random needs --device cuda: 8.4B parameters in bf16 with gradients "
                             "and optimizer state do not fit a CPU run (use --model small on CPU)")
        return random_7b_setup(**common)
    if model_name in BUILT_MODELS:
        from models.tiny import build_tiny_checkpoint

        path = build_tiny_checkpoint(Path(tmp) / model_name, seed=0, **BUILT_MODELS[model_name])
        return checkpoint_setup(path, model_name, **common)
    if model_name is None:  # the config's model, built as the trainer builds it when asked to
        from grpo.setup import prepare_model

        prepare_model(cfg)
        model_name = cfg.model.path
    return checkpoint_setup(model_name, model_name, **common)


# --------------------------------------------------------------------------- the two ways to call the model


def repeat_prompts(prompts, G):
    """Every prompt tensor G times, the audio features included: [B, ...] -> [B*G, ...]."""
    return {k: v.repeat_interleave(G, dim=0) for k, v in prompts.items()}


def ours_generate(model, prompts, s, G, step, chunk_prompts=None, real_frames=True):
    # the trainer's rollout: one row seed per completion (counter-based sampling)
    B = prompts["input_ids"].shape[0]
    seeds = completion_seeds(0, step, 0, list(range(B)), G)
    return sample_completions(model, prompts, s, group_size=G, chunk_prompts=chunk_prompts or B, row_seeds=seeds,
                              real_frames=real_frames, return_logprobs=True)  # [N, T], the sampler's log-probs [N, T]


def ours_logprobs(model, prompts, ids, G, temperature, with_entropy=False, shared_prefix=True, real_frames=True):
    # the trainer's log-prob pass (grpo.trainer calls the same function with the config's switches)
    return policy_logprobs(model, prompts, ids, temperature=temperature, with_entropy=with_entropy,
                           shared_prefix=shared_prefix, real_frames=real_frames)


def ours_variant(shared_prefix, real_frames):
    """The trainer's path with the two exact savings (model.shared_prefix, model.audio_real_frames) on or off."""
    return (partial(ours_generate, real_frames=real_frames),
            partial(ours_logprobs, shared_prefix=shared_prefix, real_frames=real_frames))


@torch.no_grad()
def naive_generate(model, prompts, s, G, step, chunk_prompts=None):
    from transformers import GenerationConfig

    torch.manual_seed(step)  # HF sampling draws from the global generator
    config = GenerationConfig(do_sample=True, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p, eos_token_id=s.end_token_ids,
                              pad_token_id=s.pad_token_id, suppress_tokens=s.suppress_token_ids)
    B = prompts["input_ids"].shape[0]
    chunk_prompts = chunk_prompts or B
    out = []
    for start in range(0, B, chunk_prompts):
        rep = repeat_prompts(slice_prompts(prompts, start, start + chunk_prompts), G)  # [n, ...]: G encoder passes
        ids = model.generate(**rep, generation_config=config)  # [n, P+T]
        out.append(ids[:, rep["input_ids"].shape[1]:])  # [n, T]
    return torch.cat(out)  # [N, T]: fixed length, the end tokens are suppressed


def naive_logprobs(model, prompts, ids, G, temperature, with_entropy=False):
    rep = repeat_prompts(prompts, G)
    P = rep["input_ids"].shape[1]
    input_ids = torch.cat([rep["input_ids"], ids], dim=1)  # [N, P+T]
    mask = torch.cat([rep["attention_mask"], torch.ones_like(ids)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask, input_features=rep["input_features"],
                   feature_attention_mask=rep["feature_attention_mask"]).logits  # [N, P+T, V]
    # TRL 0.14's _get_per_token_logps: log_softmax at every position, then keep the completion's
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [N, P+T-1, V] fp32
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [N, P+T-1]
    return token_logp[:, P - 1:]  # [N, T]  (TRL 0.14 logs no entropy: with_entropy is ignored)


# ours: the trainer's defaults. per_row: the trainer with both exact savings off (the encoder over
# the whole window, each prompt through the decoder once per completion); real_frames and
# shared_prefix: one saving each. naive: the benchmark's own model of R1-AQA's trainer.
MODES = {
    "ours": ours_variant(shared_prefix=True, real_frames=True),
    "per_row": ours_variant(shared_prefix=False, real_frames=False),
    "real_frames": ours_variant(shared_prefix=False, real_frames=True),
    "shared_prefix": ours_variant(shared_prefix=True, real_frames=False),
    "naive": (naive_generate, naive_logprobs),
}
MODE_SETS = {"both": ["ours", "naive"], "ablation": ["ours", "per_row", "real_frames", "shared_prefix", "naive"]}


# --------------------------------------------------------------------------- optimizer


class CPUOffloadOptimizer:
    """An optimizer whose state, and the copy of the parameters it updates, live on the CPU.

    step(): gradients to the CPU (pinned buffers), the optimizer step there (fused AdamW where
    torch has it), the new weights back to the device. The device then holds only the weights,
    gradients and activations: for the 7B in bf16, AdamW's 2 x 16.8 GB of state move to the host.
    """

    def __init__(self, params, make):
        self.params = list(params)
        pin = bool(self.params) and self.params[0].is_cuda
        self.host = []
        for p in self.params:
            h = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            h.copy_(p.detach())
            h.grad = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            self.host.append(h)
        self._grads = [h.grad for h in self.host]
        self.optimizer = make(self.host, cpu=True)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self):
        for p, h, g in zip(self.params, self.host, self._grads):
            if p.grad is None:  # no gradient: the optimizer skips it, as it would on the device
                h.grad = None
            else:
                h.grad = g
                g.copy_(p.grad, non_blocking=True)
        if self.params and self.params[0].is_cuda:
            torch.cuda.synchronize(self.params[0].device)
        self.optimizer.step()
        for p, h in zip(self.params, self.host):
            p.data.copy_(h, non_blocking=True)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def make_optimizer(model, cfg: Config, name, cpu_offload):
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optimizer

    def make(ps, cpu=False):
        if name == "sgd":  # no optimizer state: lets the 7B fit one 80 GB GPU without offload
            return torch.optim.SGD(ps, lr=o.lr)
        kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=o.weight_decay)
        if cpu:
            try:  # one vectorised kernel over all parameters on the CPU (torch >= 2.4)
                return torch.optim.AdamW(ps, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(ps, **kwargs)  # what the trainer builds

    return CPUOffloadOptimizer(params, make) if cpu_offload else make(params)


# --------------------------------------------------------------------------- timing and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:  # hand freed heap pages back to the OS, or they would count in the next phase's RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def timed(device, fn, probe=True):
    """fn() -> (result, seconds, peak GB within the call; 0.0 without `probe`).

    The peak's reset (a gc.collect and malloc_trim on the CPU) runs before the clock starts,
    but inside any region that encloses this call: steps timed for their speed pass
    ``probe=False`` (see ``run_modes``)."""
    sync(device)
    if probe:
        reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, peak_gb(device) if probe else 0.0


# --------------------------------------------------------------------------- one step


class Bench:
    """The model, prompts, settings and optimizer shared by both modes."""

    def __init__(self, setup, cfg: Config, optimizer, device):
        self.setup, self.cfg, self.optimizer, self.device = setup, cfg, optimizer, device
        self.G = cfg.rollout.group_size
        self.B = setup.prompts["input_ids"].shape[0]
        self.N = self.B * self.G
        self.T = setup.settings.max_new_tokens
        # tokens through one log-prob pass: the real prompt tokens of every row, plus T per completion
        self.pass_tokens = int(setup.prompts["attention_mask"].sum()) * self.G + self.N * self.T


def as_entry_point(logprobs_fn):
    """A mode's log-prob function (model, prompts, ids, G, temperature, with_entropy) with the
    signature of models.policy.policy_logprobs, the step's ``StepContext.logprobs``: micro-batches
    inside, and zeros for the entropy where the mode computes none (TRL 0.14 logs no entropy)."""
    def logprobs(model, prompts, ids, *, temperature, with_entropy=False, micro_batch_prompts=None, **_switches):
        B = prompts["input_ids"].shape[0]
        G, m = ids.shape[0] // B, micro_batch_prompts or B
        parts = []
        for lo in range(0, B, m):
            out = logprobs_fn(model, slice_prompts(prompts, lo, lo + m), ids[lo * G:(lo + m) * G], G, temperature,
                              with_entropy=with_entropy)
            parts.append(out if isinstance(out, tuple) or not with_entropy else (out, torch.zeros_like(out)))
        if with_entropy:
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return torch.cat(parts)
    return logprobs


class TimedOptimizer:
    """The run's optimizer, its steps timed and their peak memory kept apart from the
    forward/backward's (the step calls ``step`` once per pass, after clipping). Without
    `probe`, no peak is read or reset: the optimizer step sits inside the update's timed region."""

    def __init__(self, optimizer, device, probe=True):
        self.optimizer, self.device, self.probe = optimizer, device, probe
        self.seconds, self.peak, self.forward_backward_peak = 0.0, 0.0, 0.0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self):
        sync(self.device)
        if self.probe:
            self.forward_backward_peak = max(self.forward_backward_peak, peak_gb(self.device))
            reset_peak(self.device)
        t0 = time.perf_counter()
        self.optimizer.step()
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        if self.probe:
            self.peak = max(self.peak, peak_gb(self.device))
            reset_peak(self.device)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def grpo_step(bench, mode, step, probe_memory=False):
    """One GRPO step in ``mode``: the trainer's own ``grpo.step.rollout`` and ``policy_update``,
    given the mode's pieces (how it samples, how it computes log-probs) and the benchmark's
    fixed prompts with random 0/1 rewards. Returns {phase: (seconds, peak GB)} and the loss.

    With `probe_memory`, each phase's peak memory is reset and read around it; those probes
    (a gc.collect and malloc_trim each on the CPU) fall inside the production step's timed
    regions, so such a step's seconds are not a speed figure. Without it, every peak is 0.0."""
    setup, cfg, device, G = bench.setup, bench.cfg, bench.device, bench.G
    model, prompts, s = setup.model, setup.prompts, setup.settings
    generate_fn, logprobs_fn = MODES[mode]
    entry_point, peaks, no_grad_peaks = as_entry_point(logprobs_fn), {}, []

    def fixed_round(ctx, step_, round_):  # the step's stages 1-2: the benchmark's prompts, random rewards
        draw = step * 1000 + round_  # a dynamic-sampling round samples the same prompts again, other draws
        out, _, peak = timed(device, lambda: generate_fn(
            model, prompts, s, G, draw, chunk_prompts=cfg.rollout.generation_batch_prompts), probe_memory)
        peaks["rollout"] = max(peaks.get("rollout", 0.0), peak)
        ids, sampler_logp = out if isinstance(out, tuple) else (out, None)  # naive: generate keeps none
        if ids.shape != (bench.N, bench.T):
            raise RuntimeError(f"{mode}: completions {tuple(ids.shape)}, expected {(bench.N, bench.T)}")
        rewards = torch.randint(0, 2, (bench.N,), generator=torch.Generator().manual_seed(draw)).float()
        return Round(samples=[None] * bench.B, waves=[None] * bench.B, prompts=prompts, ids=ids, texts=[""] * bench.N,
                     rewards=rewards.view(bench.B, G), per_reward={"accuracy": rewards.tolist()},  # a random 0/1 accuracy
                     sampler_logp=sampler_logp)

    def logprobs(*args, **kwargs):  # the passes without gradients measured one by one (pi_old, then pi_ref)
        if torch.is_grad_enabled():
            return entry_point(*args, **kwargs)
        out, _, peak = timed(device, lambda: entry_point(*args, **kwargs), probe_memory)
        no_grad_peaks.append(peak)
        return out

    optimizer = TimedOptimizer(bench.optimizer, device, probe_memory)
    reference = FrozenCopy(model, model) if cfg.algorithm.beta > 0 else NoReference()
    ctx = StepContext(settings=StepSettings.from_config(cfg), model=model, reference=reference,
                      optimizer=optimizer, sampling=s, stream=None, device=device,
                      processor=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=s.pad_token_id)),
                      total_updates=10**9, loss=loss_spec(cfg), advantage=advantage_spec(cfg),
                      correction=correction_spec(cfg),
                      rounds_from=fixed_round, logprobs=logprobs)
    traj, seen = rollout(ctx, step)  # the reference pass reuses the policy's weights: the same compute
    if probe_memory:
        reset_peak(device)
    update = policy_update(ctx, Counters(), traj)
    phases = {"rollout": (seen.seconds["rollout"], peaks["rollout"])}
    if cfg.algorithm.beta > 0:
        phases["reference"] = (seen.seconds["reference"], no_grad_peaks[-1])
    if cfg.algorithm.mu > 1:
        phases["old_logprobs"] = (seen.seconds["old_logp"], no_grad_peaks[0])
    phases["forward_backward"] = (update.seconds - optimizer.seconds, optimizer.forward_backward_peak)
    phases["optimizer"] = (optimizer.seconds, optimizer.peak)
    return phases, update.losses[-1]


def summarize(bench, steps, loss, memory):
    """Medians over the timed steps, throughputs, and the peaks of the memory step `memory`."""
    mu = bench.cfg.algorithm.mu
    gen_tokens = bench.N * bench.T
    result = {"loss": loss, "phases": {}}
    for name in [p for p in PHASES if p in steps[0]]:
        seconds = [p[name][0] for p in steps]
        med = statistics.median(seconds)
        tokens = {"rollout": gen_tokens, "reference": bench.pass_tokens, "old_logprobs": bench.pass_tokens,
                  "forward_backward": bench.pass_tokens * mu}.get(name)
        result["phases"][name] = {"seconds": med, "all_seconds": seconds,
                                  "tokens_per_s": tokens / med if tokens else None,
                                  "peak_memory_gb": memory[name][1]}
    total = [sum(t for t, _ in p.values()) for p in steps]
    med = statistics.median(total)
    result["step"] = {
        "seconds": med, "all_seconds": total,
        "completions_per_s": bench.N / med,
        "generated_tokens_per_s": gen_tokens / med,
        # prompt + completion tokens through the policy forward/backward, per second of that phase
        "training_tokens_per_s": bench.pass_tokens * mu / result["phases"]["forward_backward"]["seconds"],
        "peak_memory_gb": max(m for _, m in memory.values()),
    }
    return result


def run_modes(bench, modes, args):
    """Warm-up steps of each mode, then `repeats` timed steps, the modes alternating step by step,
    then one more step of each mode that measures the phases' peak memory (its seconds unused):
    the timed steps run without any memory probe inside them."""
    steps = {m: [] for m in modes}
    losses, memory = {}, {}
    n = args.warmup + args.repeats
    for i in range(n + 1):
        for mode in modes:
            phases, loss = grpo_step(bench, mode, step=i, probe_memory=i == n)
            if i == n:
                memory[mode] = phases
                continue
            losses[mode] = loss
            if i >= args.warmup:
                steps[mode].append(phases)
            print(f"  {mode} step {i}{' (warm-up)' if i < args.warmup else ''}: "
                  + ", ".join(f"{k} {t:.3f} s" for k, (t, _) in phases.items()), file=sys.stderr, flush=True)
    return {m: summarize(bench, steps[m], losses[m], memory[m]) for m in modes}


# --------------------------------------------------------------------------- correctness cross-check


def cross_check(bench):
    """Both paths on the same sampled completions: log-probs, loss and a few parameters' gradients.

    The update is the same function of the log-probs in both modes, so equal log-probs and
    gradients mean the two modes train the same model (only the cost differs).
    """
    setup, device, G, a = bench.setup, bench.device, bench.G, bench.cfg.algorithm
    model, prompts, s = setup.model, setup.prompts, setup.settings
    model.eval()  # no dropout: the two forwards must see the same function
    ids, _ = ours_generate(model, prompts, s, G, step=12345)
    N = ids.shape[0]
    rewards = torch.tensor([float(i % 2) for i in range(N)])  # distinct rewards in every group
    advantages = group_advantages(rewards, G).to(device)
    mask = completion_mask(ids, s.end_token_ids)
    inner = model.model
    watched = {"lm_head": model.lm_head.weight,
               "decoder.layers.0.mlp.up_proj": inner.language_model.layers[0].mlp.up_proj.weight,
               "projector": inner.multi_modal_projector.linear.weight,
               "audio_tower.layers.0.fc1": inner.audio_tower.layers[0].fc1.weight}
    # one pi_old for both modes, shifted from pi_theta so that the ratio (and clipping) depends on logp
    with torch.no_grad():
        old = ours_logprobs(model, prompts, ids, G, s.temperature).float()
    old = old + 0.3 * torch.linspace(-1, 1, old.numel(), device=device).view_as(old)
    out = {}
    for mode, (_, logprobs_fn) in MODES.items():
        logp = logprobs_fn(model, prompts, ids, G, s.temperature)
        spec = LossSpec(loss_type=a.loss_type, max_completion_length=ids.shape[1], eps_low=a.eps_low,
                        eps_high=a.eps_high, importance_level=a.importance_level)
        loss, _ = policy_loss(logp, old, advantages, mask, spec)
        loss.backward()
        out[mode] = (logp.detach().float(), loss.item(), {k: p.grad.detach().float().clone() for k, p in watched.items()})
        model.zero_grad(set_to_none=True)
    (lo, so, go), (ln, sn, gn) = out["ours"], out["naive"]
    return {
        "logp_max_abs_diff": (lo - ln).abs().max().item(),
        "logp_max_abs_diff_vs_naive": {m: (o[0] - ln).abs().max().item() for m, o in out.items() if m != "naive"},
        "loss_ours": so, "loss_naive": sn, "loss_abs_diff": abs(so - sn),
        "grad_max_rel_diff": {k: ((go[k] - gn[k]).abs().max() / gn[k].abs().max().clamp(min=1e-30)).item()
                              for k in watched},
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, as for train.py (applied last)")
    p.add_argument("--config", help="a training config (YAML): model, batch shape, sampling, loss, optimizer")
    p.add_argument("--model", default=None, help="tiny | small | anchor | 7b-random | PATH to a checkpoint "
                   "directory (default: the config's model.path, or tiny without --config)")
    p.add_argument("--mode", default="both", choices=[*MODES, *MODE_SETS],
                   help="one mode, 'both' (ours and naive) or 'ablation' (every mode, alternating)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="model.dtype (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--prompts", type=int, default=None, help="B, prompts per step (rollout.prompts_per_step)")
    p.add_argument("--group-size", type=int, default=None, help="G, completions per prompt (rollout.group_size)")
    p.add_argument("--new-tokens", type=int, default=None, help="T, tokens per completion, fixed "
                   "(rollout.max_new_tokens)")
    p.add_argument("--beta", type=float, default=None, help="algorithm.beta; > 0 adds the reference pass")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="audio per prompt (AVQA: 10 s), "
                   "capped at the model's window")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--cpu-offload", action=argparse.BooleanOptionalAction, default=None,
                   help="optimizer state (and its copy of the weights) on the CPU (default: "
                   "distribution.cpu_offload)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing in both modes (default: distribution.activation_checkpointing, "
                   "on for 7b-random)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a "
                   "busy machine 1 avoids OpenMP threads waiting on each other (small ops 25x slower)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-check ours against naive on the same completions (default: on with --mode both)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def resolve_config(args) -> Config:
    """The config file (or the benchmark's defaults), then the flag shorthands, then the overrides."""
    overrides = [] if args.config else list(BENCH_DEFAULTS)
    flags = {"rollout.prompts_per_step": args.prompts, "rollout.group_size": args.group_size,
             "rollout.max_new_tokens": args.new_tokens, "algorithm.beta": args.beta, "model.dtype": args.dtype}
    overrides += [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += list(args.overrides)
    cfg = load_config(args.config, overrides)
    if not args.config:  # one micro-batch and one generation batch holding all B prompts, unless told
        given = {o.split("=", 1)[0] for o in args.overrides}
        if "algorithm.micro_batch_prompts" not in given:
            cfg.algorithm.micro_batch_prompts = cfg.rollout.prompts_per_step
        if "rollout.generation_batch_prompts" not in given:
            cfg.rollout.generation_batch_prompts = cfg.rollout.prompts_per_step
    if cfg.algorithm.name != "grpo":
        raise SystemExit(f"algorithm.name={cfg.algorithm.name}: the benchmark times GRPO steps")
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = resolve_config(args)
    model_name = args.model if args.model is not None else (None if args.config else "tiny")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    modes = MODE_SETS.get(args.mode, [args.mode])

    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(model_name, cfg, args, device, dtype, tmp)
    model = setup.model
    model.requires_grad_(True)
    model.model.audio_tower.embed_positions.requires_grad_(False)  # fixed sinusoids, as set_trainable does
    if args.grad_checkpointing is not None:
        grad_ckpt = args.grad_checkpointing
    else:
        grad_ckpt = cfg.distribution.activation_checkpointing or model_name == "7b-random"
    if grad_ckpt:
        enable_activation_checkpointing(model)
    cpu_offload = args.cpu_offload if args.cpu_offload is not None else cfg.distribution.cpu_offload
    bench = Bench(setup, cfg, make_optimizer(model, cfg, args.optimizer, cpu_offload), device)

    r, a = cfg.rollout, cfg.algorithm
    results = {
        "model": model_name if model_name is not None else cfg.model.path, "description": setup.description,
        "command": " ".join(["python -m benchmarks.bench_step", *(argv if argv is not None else sys.argv[1:])]),
        "config_file": args.config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],  # other processes on the machine skew CPU timings
        "shape": {"prompts": bench.B, "group_size": bench.G, "new_tokens": bench.T,
                  "prompt_length": setup.prompts["input_ids"].shape[1],
                  "prompt_tokens": int(setup.prompts["attention_mask"].sum()),
                  "tokens_per_logprob_pass": bench.pass_tokens, "clip_seconds": args.clip_seconds,
                  "generation_batch_prompts": r.generation_batch_prompts,
                  "micro_batch_prompts": a.micro_batch_prompts, "beta": a.beta, "mu": a.mu,
                  "loss_type": a.loss_type, "temperature": r.temperature, "top_k": r.top_k, "top_p": r.top_p,
                  "optimizer": args.optimizer, "lr": cfg.optimizer.lr, "max_grad_norm": cfg.optimizer.max_grad_norm,
                  "cpu_offload": cpu_offload, "grad_checkpointing": grad_ckpt},
        "config": to_dict(cfg),
        "memory": "torch.cuda.max_memory_allocated per phase" if device.type == "cuda"
        else "peak RSS per phase (VmHWM, reset via /proc/self/clear_refs)",
        "modes": {},
    }
    print(f"{setup.description}: {results['parameters'] / 1e6:.2f}M parameters, prompt length "
          f"{results['shape']['prompt_length']}, {dtype}, {results['device']}", file=sys.stderr)
    results["modes"] = run_modes(bench, modes, args)
    write_json(results, args.json)  # before the cross-check: a failure there keeps the timings
    if "ours" in modes and "naive" in modes:
        results["speedup"] = speedups(results["modes"], "naive", "ours")
    if "ours" in modes and "per_row" in modes:
        results["speedup_vs_per_row"] = speedups(results["modes"], "per_row", "ours")
    if args.check if args.check is not None else ("ours" in modes and "naive" in modes):
        results["check"] = cross_check(bench)

    print_table(results)
    write_json(results, args.json)
    return results


def speedups(modes, slow, fast):
    """Per phase and per step: seconds of mode `slow` / seconds of mode `fast`."""
    a, b = modes[slow], modes[fast]
    out = {name: a["phases"][name]["seconds"] / b["phases"][name]["seconds"] for name in b["phases"]}
    out["step"] = a["step"]["seconds"] / b["step"]["seconds"]
    return out


def write_json(results, path):
    """The benchmark's results as indented JSON at ``path`` (its folder made), when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))


def print_table(r):
    sh = r["shape"]
    print(f"\n{r['description']} | {r['parameters'] / 1e6:.2f}M params | {r['dtype']} | {r['device']} | "
          f"B={sh['prompts']} G={sh['group_size']} T={sh['new_tokens']} P={sh['prompt_length']} "
          f"beta={sh['beta']} mu={sh['mu']} {sh['optimizer']}{' cpu-offload' if sh['cpu_offload'] else ''}")
    print(f"{'mode':13} {'phase':17} {'median s':>9} {'tokens/s':>10} {'peak GB':>8}")
    for mode, m in r["modes"].items():
        for name, ph in m["phases"].items():
            tps = f"{ph['tokens_per_s']:10.1f}" if ph["tokens_per_s"] else f"{'':10}"
            print(f"{mode:13} {name:17} {ph['seconds']:9.3f} {tps} {ph['peak_memory_gb']:8.2f}")
        st = m["step"]
        print(f"{mode:13} {'step':17} {st['seconds']:9.3f} {'':10} {st['peak_memory_gb']:8.2f}   "
              f"{st['completions_per_s']:.2f} completions/s, {st['generated_tokens_per_s']:.1f} generated tok/s, "
              f"{st['training_tokens_per_s']:.1f} training tok/s")
    print("tokens/s: rollout = generated tokens; reference, old_logprobs, forward_backward = prompt + completion "
          "tokens through the model")
    if "speedup" in r:
        print("speed-up naive/ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items()))
    if "speedup_vs_per_row" in r:
        print("speed-up per_row/ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup_vs_per_row"].items()))
    if "check" in r:
        c = r["check"]
        print(f"cross-check: max |logp ours - naive| {c['logp_max_abs_diff']:.2e}, "
              f"loss {c['loss_ours']:.6f} vs {c['loss_naive']:.6f}, grad max rel diff "
              f"{max(c['grad_max_rel_diff'].values()):.2e}")


if __name__ == "__main__":
    main()
