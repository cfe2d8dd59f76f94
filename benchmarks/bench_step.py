"""Time one GRPO step, ours against a naive transformers-style trainer (project issue 6).

One step = generation (B prompts x G completions x T new tokens), the reference log-prob pass
(when beta > 0), and the update (log-probs with gradients, GRPO loss, backward, grad clip,
optimizer step). Both modes run the same prompts, G, T, sampling settings, loss and optimizer;
they differ only in how the model is called:

    phase        naive (what R1-AQA's TRL fork does, SPEC section 6)  ours (the trainer's path)
    -----------  ---------------------------------------------------  -------------------------------------
    generation   model.generate on the G-times repeated inputs:       grpo.rollout.sample_completions:
                 every copy of a clip goes through the encoder        each clip encoded once, embeddings
                                                                      repeated G times, models.policy.generate
                                                                      with a KV cache
    log-probs    model(**inputs) on the G-times repeated inputs,      models.policy.prompt_embeddings (clip
                 logits [N, P+T, V] in fp32, log_softmax over the     once) + completion_logprobs (logits only
                 whole sequence, then the completion columns kept     at completion positions, in chunks)

Fixed completion length: both modes suppress the end tokens (ours: added to the suppressed ids;
naive: generate's `suppress_tokens`), so every completion is exactly --new-tokens long and both
modes do the same useful work (a random model would otherwise stop at random lengths).

Rewards are random 0/1 (fixed seed): the benchmark times the model, not the reward functions.
The reference pass reuses the policy's weights under no_grad: the same compute as a frozen copy,
without a second copy in memory.

Memory: on CUDA the peak of torch.cuda.max_memory_allocated within each phase (weights, gradients
and optimizer state included). On CPU the peak resident set size (VmHWM of /proc/self/status,
reset at each phase start through /proc/self/clear_refs after malloc_trim; the whole process,
libraries included); where that reset is not allowed, resource.getrusage's ru_maxrss, which
never goes down, so later phases report at least the earlier peaks.

Models: tiny (the test model), small (~33M params), anchor (SPEC 6's 5.4M CPU anchor),
7b-random (Qwen2-Audio-7B's architecture, configs/qwen2_audio_7b_random.yaml, GPU only), or a
checkpoint directory. Results and commands: benchmarks/RESULTS.md.

    python benchmarks/bench_step.py --model small --mode both --prompts 2 --group-size 4 \
        --new-tokens 16 --repeats 3 --threads 1 --json runs/bench_small.json
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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from data.datasets import Sample  # noqa: E402
from grpo.algorithm import completion_mask, group_advantages, policy_loss  # noqa: E402
from grpo.rollout import SamplingSettings, completion_seeds, prompt_batch, sample_completions  # noqa: E402
from models.loading import end_token_ids, load_generation_config, load_model, load_processor  # noqa: E402
from models.policy import audio_output_lengths, completion_logprobs, prompt_embeddings, suppressed_token_ids  # noqa: E402

CONFIG_7B = ROOT / "configs" / "qwen2_audio_7b_random.yaml"

# Random models built by build_tiny_checkpoint. `small` is big enough that per-token Python
# overheads do not dominate, with the real 30 s audio window (the encoder always runs 1500
# positions, SPEC 3) and a vocabulary much larger than its tokenizer (unused ids suppressed).
BUILT_MODELS = {
    "tiny": dict(),  # the test model: hidden 64, 2 + 2 layers, 3 s window, vocab 512 (~257k params)
    "small": dict(text_hidden=512, text_layers=8, audio_hidden=384, audio_layers=4, vocab_size=8192,
                  audio_seconds=30),  # ~33M params
    # SPEC 6's CPU anchor, on which R1-AQA's own trainer took 10.4 s per step (2 prompts x 8 x 32
    # tokens, beta 0.04): hidden 256, 4 + 4 layers, 30 s window, ~5.4M params
    "anchor": dict(text_hidden=256, text_layers=4, audio_hidden=256, audio_layers=4, audio_seconds=30),
}

# R1-AQA's sampling (SPEC 1): temperature 1.0, top-k 50, top-p 1.0
TEMPERATURE, TOP_K, TOP_P = 1.0, 50, 1.0
QUESTIONS = [
    ("What is the main sound source in the audio?", ["dog", "cat", "bird", "car"]),
    ("Is the pitch of the tone rising or falling?", ["rising", "falling", "steady"]),
    ("How many times does the sound repeat?", ["one", "two", "three", "four"]),
    ("Which tone is louder, the first or the second?", ["first", "second"]),
]


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


def checkpoint_setup(path, name, *, n_prompts, clip_seconds, device, dtype, new_tokens):
    """A checkpoint directory (tiny, small or a real one): prompts through the real processor, prompt <2>."""
    model = load_model(path, dtype=dtype, device=device)
    processor = load_processor(path)
    gen = load_generation_config(path)
    ends = end_token_ids(gen)
    window = processor.feature_extractor.chunk_length
    clip_seconds = min(clip_seconds, window)
    samples = [Sample(id=f"bench-{i}", audio_path="", question=q, choices=c, answer=c[0], task=None, meta={})
               for i, (q, c) in enumerate(QUESTIONS[i % len(QUESTIONS)] for i in range(n_prompts))]
    prompts = prompt_batch(samples, tone_clips(n_prompts, clip_seconds), processor, template=2, device=device)
    vocab = model.config.text_config.vocab_size
    settings = fixed_length_settings(
        new_tokens, ends, gen.pad_token_id if gen.pad_token_id is not None else ends[-1],
        # ids the tokenizer does not have (small's vocabulary is padded) are never sampled either
        suppressed_token_ids(processor.tokenizer, vocab_size=vocab))
    return Setup(model, prompts, settings, f"{name} ({clip_seconds:g} s clips, {window} s window)")


def random_7b_setup(*, n_prompts, clip_seconds, device, dtype, new_tokens):
    """Qwen2-Audio-7B's architecture with random weights, built on the GPU (no tokenizer: the prompts'
    token ids are built by hand with the chat template's structure, SPEC 1)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    spec = yaml.safe_load(CONFIG_7B.read_text())
    config = Qwen2AudioConfig(audio_config=spec["audio_config"], text_config=spec["text_config"],
                              audio_token_index=spec["audio_token_id"])
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
    settings = fixed_length_settings(new_tokens, spec["end_token_ids"], spec["pad_token_id"], suppress)
    return Setup(model, prompts, settings, f"Qwen2-Audio-7B architecture, random weights ({clip_seconds:g} s clips)")


def fixed_length_settings(new_tokens, ends, pad_id, suppress):
    """R1-AQA's sampling with the end tokens suppressed too: every completion runs to new_tokens."""
    return SamplingSettings(max_new_tokens=new_tokens, end_token_ids=list(ends), pad_token_id=pad_id,
                            suppress_token_ids=sorted(set(suppress) | set(ends)), temperature=TEMPERATURE,
                            top_k=TOP_K, top_p=TOP_P)


def build_setup(args, device, dtype, tmp):
    common = dict(n_prompts=args.prompts, clip_seconds=args.clip_seconds, device=device, dtype=dtype,
                  new_tokens=args.new_tokens)
    if args.model == "7b-random":
        if device.type != "cuda":
            raise SystemExit("--model 7b-random needs --device cuda: 8.4B parameters in bf16 with gradients "
                             "and optimizer state do not fit a CPU run (use --model small on CPU)")
        return random_7b_setup(**common)
    if args.model in BUILT_MODELS:
        from models.tiny import build_tiny_checkpoint

        path = build_tiny_checkpoint(Path(tmp) / args.model, seed=0, **BUILT_MODELS[args.model])
        return checkpoint_setup(path, args.model, **common)
    return checkpoint_setup(args.model, args.model, **common)


# --------------------------------------------------------------------------- the two ways to call the model


def repeat_prompts(prompts, G):
    """Every prompt tensor G times, the audio features included: [B, ...] -> [B*G, ...]."""
    return {k: v.repeat_interleave(G, dim=0) for k, v in prompts.items()}


def ours_generate(model, prompts, s, G, step):
    # the trainer's rollout: one row seed per completion (counter-based sampling)
    seeds = completion_seeds(0, step, 0, list(range(prompts["input_ids"].shape[0])), G)
    return sample_completions(model, prompts, s, group_size=G, chunk_prompts=prompts["input_ids"].shape[0],
                              row_seeds=seeds)  # [N, T]


def ours_logprobs(model, prompts, ids, G, temperature):
    embeds = prompt_embeddings(model, **prompts).repeat_interleave(G, dim=0)  # [N, P, H], clip encoded once
    pmask = prompts["attention_mask"].repeat_interleave(G, dim=0)  # [N, P]
    return completion_logprobs(model, embeds, pmask, ids, temperature=temperature)  # [N, T]


@torch.no_grad()
def naive_generate(model, prompts, s, G, step):
    from transformers import GenerationConfig

    torch.manual_seed(step)  # HF sampling draws from the global generator
    rep = repeat_prompts(prompts, G)  # [N, ...]: the encoder runs on every copy during prefill
    config = GenerationConfig(do_sample=True, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p, eos_token_id=s.end_token_ids,
                              pad_token_id=s.pad_token_id, suppress_tokens=s.suppress_token_ids)
    out = model.generate(**rep, generation_config=config)  # [N, P+T]
    return out[:, rep["input_ids"].shape[1]:]  # [N, T]


def naive_logprobs(model, prompts, ids, G, temperature):
    rep = repeat_prompts(prompts, G)
    P = rep["input_ids"].shape[1]
    input_ids = torch.cat([rep["input_ids"], ids], dim=1)  # [N, P+T]
    mask = torch.cat([rep["attention_mask"], torch.ones_like(ids)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask, input_features=rep["input_features"],
                   feature_attention_mask=rep["feature_attention_mask"]).logits  # [N, P+T, V]
    # TRL 0.14's _get_per_token_logps: log_softmax at every position, then keep the completion's
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # [N, P+T-1, V] fp32
    token_logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [N, P+T-1]
    return token_logp[:, P - 1:]  # [N, T]


MODES = {"ours": (ours_generate, ours_logprobs), "naive": (naive_generate, naive_logprobs)}


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


def timed(device, fn):
    """fn() -> (result, seconds, peak GB within the call)."""
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, peak_gb(device)


# --------------------------------------------------------------------------- one step


def grpo_step(setup, optimizer, mode, *, G, beta, step, device):
    """One GRPO step in `mode`: {phase: (seconds, peak GB)} and the loss."""
    model, prompts, s = setup.model, setup.prompts, setup.settings
    generate_fn, logprobs_fn = MODES[mode]
    N = prompts["input_ids"].shape[0] * G
    phases = {}

    model.eval()
    ids, t, mem = timed(device, lambda: generate_fn(model, prompts, s, G, step))
    phases["generation"] = (t, mem)
    if ids.shape != (N, s.max_new_tokens):
        raise RuntimeError(f"{mode}: completions {tuple(ids.shape)}, expected {(N, s.max_new_tokens)}")
    mask = completion_mask(ids, s.end_token_ids)  # [N, T], all true: the end tokens are suppressed
    rewards = torch.randint(0, 2, (N,), generator=torch.Generator().manual_seed(step)).float()
    advantages = group_advantages(rewards, G).to(device)  # [N]

    ref_logp = None
    if beta > 0:
        def reference():
            with torch.no_grad():
                return logprobs_fn(model, prompts, ids, G, s.temperature)
        ref_logp, t, mem = timed(device, reference)
        phases["reference"] = (t, mem)

    def update():
        model.train()
        logp = logprobs_fn(model, prompts, ids, G, s.temperature)  # [N, T] with gradients
        loss, _ = policy_loss(logp, logp.detach(), advantages, mask, ref_logp=ref_logp, beta=beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    loss, t, mem = timed(device, update)
    phases["update"] = (t, mem)
    return phases, loss


def make_optimizer(model, name):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":  # no optimizer state: lets the 7B fit one 80 GB GPU
        return torch.optim.SGD(params, lr=1e-6)
    return torch.optim.AdamW(params, lr=1e-6)  # R1-AQA's lr (SPEC 1)


def run_mode(setup, mode, args, device):
    """Warm-up steps, then `repeats` timed steps: the median of each phase, tokens/s, peak memory."""
    optimizer = make_optimizer(setup.model, args.optimizer)
    n_tokens = args.prompts * args.group_size * args.new_tokens
    steps = []
    for i in range(args.warmup + args.repeats):
        phases, loss = grpo_step(setup, optimizer, mode, G=args.group_size, beta=args.beta, step=i, device=device)
        if i >= args.warmup:
            steps.append(phases)
        print(f"  {mode} step {i}{' (warm-up)' if i < args.warmup else ''}: "
              + ", ".join(f"{k} {t:.3f} s" for k, (t, _) in phases.items()), file=sys.stderr, flush=True)
    del optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    result = {"loss": loss, "phases": {}}
    for name in steps[0]:
        seconds = [p[name][0] for p in steps]
        result["phases"][name] = {"seconds": statistics.median(seconds), "all_seconds": seconds,
                                  "tokens_per_s": n_tokens / statistics.median(seconds),
                                  "peak_memory_gb": max(p[name][1] for p in steps)}
    total = [sum(t for t, _ in p.values()) for p in steps]
    result["total"] = {"seconds": statistics.median(total), "all_seconds": total,
                       "tokens_per_s": n_tokens / statistics.median(total),
                       "peak_memory_gb": max(m for p in steps for _, m in p.values())}
    return result


# --------------------------------------------------------------------------- correctness cross-check


def cross_check(setup, G, device):
    """Both paths on the same sampled completions: log-probs, loss and a few parameters' gradients.

    The update is the same function of the log-probs in both modes, so equal log-probs and
    gradients mean the two modes train the same model (only the cost differs).
    """
    model, prompts, s = setup.model, setup.prompts, setup.settings
    model.eval()  # no dropout: the two forwards must see the same function
    ids = ours_generate(model, prompts, s, G, step=12345)
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
        loss, _ = policy_loss(logp, old, advantages, mask)
        loss.backward()
        out[mode] = (logp.detach().float(), loss.item(), {k: p.grad.detach().float().clone() for k, p in watched.items()})
        model.zero_grad(set_to_none=True)
    (lo, so, go), (ln, sn, gn) = out["ours"], out["naive"]
    return {
        "logp_max_abs_diff": (lo - ln).abs().max().item(),
        "loss_ours": so, "loss_naive": sn, "loss_abs_diff": abs(so - sn),
        "grad_max_rel_diff": {k: ((go[k] - gn[k]).abs().max() / gn[k].abs().max().clamp(min=1e-30)).item()
                              for k in watched},
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | small | anchor | 7b-random | PATH to a checkpoint directory")
    p.add_argument("--mode", default="both", choices=["ours", "naive", "both"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--prompts", type=int, default=2, help="B, prompts per step")
    p.add_argument("--group-size", type=int, default=4, help="G, completions per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="T, tokens per completion (fixed)")
    p.add_argument("--clip-seconds", type=float, default=10.0, help="audio per prompt (AVQA: 10 s), "
                   "capped at the model's window")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight; > 0 adds the reference log-prob pass")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing in both modes (default: on for 7b-random only)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a "
                   "busy machine 1 avoids OpenMP threads waiting on each other (small ops 25x slower)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="cross-check ours against naive on the same completions (default: on with --mode both)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    modes = ["ours", "naive"] if args.mode == "both" else [args.mode]

    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(args, device, dtype, tmp)
    model = setup.model
    model.requires_grad_(True)
    model.model.audio_tower.embed_positions.requires_grad_(False)  # fixed sinusoids, as set_trainable does
    grad_ckpt = args.grad_checkpointing if args.grad_checkpointing is not None else args.model == "7b-random"
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    results = {
        "model": args.model, "description": setup.description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "load_average_at_start": os.getloadavg()[0],  # other processes on the machine skew CPU timings
        "shape": {"prompts": args.prompts, "group_size": args.group_size, "new_tokens": args.new_tokens,
                  "prompt_length": setup.prompts["input_ids"].shape[1], "clip_seconds": args.clip_seconds,
                  "beta": args.beta, "optimizer": args.optimizer, "grad_checkpointing": grad_ckpt},
        "memory": "torch.cuda.max_memory_allocated per phase" if device.type == "cuda"
        else "peak RSS per phase (VmHWM, reset via /proc/self/clear_refs)",
        "modes": {},
    }
    print(f"{setup.description}: {results['parameters'] / 1e6:.2f}M parameters, prompt length "
          f"{results['shape']['prompt_length']}, {dtype}, {results['device']}", file=sys.stderr)
    for mode in modes:
        results["modes"][mode] = run_mode(setup, mode, args, device)
        write_json(results, args.json)  # after each mode: a long run cut short keeps what it measured
    if len(modes) == 2:
        ours, naive = results["modes"]["ours"], results["modes"]["naive"]
        results["speedup"] = {name: naive["phases"][name]["seconds"] / ours["phases"][name]["seconds"]
                              for name in ours["phases"]}
        results["speedup"]["total"] = naive["total"]["seconds"] / ours["total"]["seconds"]
    if args.check if args.check is not None else len(modes) == 2:
        results["check"] = cross_check(setup, args.group_size, device)

    print_table(results)
    write_json(results, args.json)
    return results


def write_json(results, path):
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))


def print_table(r):
    print(f"\n{r['description']} | {r['parameters'] / 1e6:.2f}M params | {r['dtype']} | {r['device']} | "
          f"B={r['shape']['prompts']} G={r['shape']['group_size']} T={r['shape']['new_tokens']} "
          f"P={r['shape']['prompt_length']}")
    print(f"{'mode':6} {'phase':11} {'median s':>9} {'tokens/s':>10} {'peak GB':>8}")
    for mode, m in r["modes"].items():
        for name, ph in [*m["phases"].items(), ("total", m["total"])]:
            print(f"{mode:6} {name:11} {ph['seconds']:9.3f} {ph['tokens_per_s']:10.1f} {ph['peak_memory_gb']:8.2f}")
    if "speedup" in r:
        print("speed-up naive/ours: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["speedup"].items()))
    if "check" in r:
        c = r["check"]
        print(f"cross-check: max |logp ours - naive| {c['logp_max_abs_diff']:.2e}, "
              f"loss {c['loss_ours']:.6f} vs {c['loss_naive']:.6f}, grad max rel diff "
              f"{max(c['grad_max_rel_diff'].values()):.2e}")


if __name__ == "__main__":
    main()
