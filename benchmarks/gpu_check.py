"""One command for a machine with one NVIDIA GPU: the two 7B recipes' steps, timed and measured
against the memory plan, decoding against the memory-bandwidth floor, the sampler/trainer gap.

    make gpu-check                      # = python benchmarks/gpu_check.py (under 10 minutes)
    python benchmarks/gpu_check.py --device cpu --shape slice   # the same logic on the CPU (tests)

What it does, in order (every number also goes to benchmarks/results/gpu_check_<device>.json
and .md, <device> the GPU's name in lower case with '-' for spaces, or 'cpu'):

 1. Qwen2-Audio-7B-Instruct's architecture (configs/qwen2_audio_7b_random.yaml) with random
    weights, built in bf16 directly on the device (models.tiny.random_model; nothing written
    to disk but the configs and the processor). --shape slice keeps the widths and
    vocabulary with 1 decoder + 1 encoder layer; --shape tiny is the test model's sizes.
 2. Per recipe, the trainer (grpo.trainer.Trainer, one process, fsdp never) runs one warm-up
    step and one measured step; each phase of the measured step is timed (CUDA synchronised)
    and its peak tensor memory taken (torch.cuda.max_memory_allocated, with max_memory_reserved
    beside it: what fragmentation adds, which the plan's margin must cover; reset at each phase
    start; on the CPU the live-tensor count of benchmarks/plan_check.py plus the tensors held
    between steps), against the plan of the same config at the same shapes
    (grpo.memory_plan.plan_memory: persistent + that phase's part; its 1 GB "CUDA context" is
    left out, max_memory_allocated does not see it). Phases: rollout (sampling and rewards),
    reference (log pi_ref), update (micro-batches' forward and backward, the AdamW step).
      lora  configs/r1_aqa_lora_24gb.yaml: 2 prompts (the step's shape per prompt is the
            recipe's: G = 8, 256 new tokens, one prompt generated and trained at a time)
      full  configs/r1_aqa.yaml, the per-GPU share of the 8-GPU step: 2 prompts x G = 8 x 256,
            micro-batches of 1, the audio encoder trained, through FSDP2 on one process (fp32
            master weights and AdamW state, bf16 compute: the path that trains); with as many
            of the 32 decoder layers as the plan fits into 90 % of the device (the number is reported)
    Completions run to the full length: the end tokens are suppressed while sampling, so a
    random model's step has the recipe's shape.
 3. Decoding: G rows of one prompt, seconds per decoding step (a 64-token generation minus a
    1-token one, over 63), tokens per second, against the floor: every weight the step reads
    (decoder, lm_head) and the KV cache it reads (every row's cached positions, each layer's
    keys and values) divided by the device's copy bandwidth (measured here: a 1 GiB
    device-to-device copy reads and writes 2 GiB; 0.25 GiB on the CPU).
 4. The sampler/trainer gap in bf16: the trainer's train/sampler_logprob_diff/{mean,max} of
    the measured step, and the same in eval mode (no LoRA dropout) on fresh completions.
 5. Where two GPUs are visible: two processes over NCCL run one FSDP2 policy update of the
    tiny model whose loss tokens straddle the log-prob chunk on one rank only
    (benchmarks/two_gpu_straddle.py): both ranks must issue the same collectives, or NCCL hangs
    until the bounded timeout. Its result ("two_gpu_straddle": ok, updates, seconds, or the
    error) is recorded; with fewer GPUs, or on the CPU, it is recorded as skipped, and why.

Without a GPU (--device cuda, the default), it says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH_7B = ROOT / "configs" / "qwen2_audio_7b_random.yaml"
GB = 2**30
RECIPES = {
    "lora": dict(config="r1_aqa_lora_24gb.yaml", overrides=["rollout.prompts_per_step=2"]),
    "full": dict(config="r1_aqa.yaml", overrides=["rollout.prompts_per_step=2", "rollout.generation_batch_prompts=2",
                                                   "algorithm.micro_batch_prompts=1", "distribution.fsdp=always"]),
}
# --shape: the model's layers and the rollout's size (the recipe's own G and T on a GPU)
SHAPES = {
    "full": dict(text_layers=32, audio_layers=32, overrides=[]),
    "slice": dict(text_layers=1, audio_layers=1, overrides=[]),
    "tiny": dict(tiny=True, overrides=[]),
}
CPU_OVERRIDES = ["rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4",
                 "rollout.generation_batch_prompts=1"]


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


# --------------------------------------------------------------------------- the model


def write_model_dir(shape: str, out: Path, text_layers: int | None = None) -> Path:
    """configs + processor of the shape at ``out`` (no weights: random_model builds them)."""
    from models.tiny import build_slice_checkpoint, build_tiny_checkpoint

    spec = SHAPES[shape]
    if spec.get("tiny"):
        return build_tiny_checkpoint(out, seed=0)
    arch = yaml.safe_load(ARCH_7B.read_text())
    return build_slice_checkpoint(out, arch, text_layers=text_layers or spec["text_layers"],
                                  audio_layers=spec["audio_layers"], weights=False)


@contextmanager
def random_weights():
    """The trainer's model loader replaced by one that builds random weights on the device
    (the same weights for the policy and a reference copy: one seed)."""
    import grpo.setup as setup_module
    from transformers import AutoConfig

    from models.tiny import random_model

    original = setup_module.load_model

    def load(path, *, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config._attn_implementation = attn_implementation
        return random_model(config, seed=0, dtype=dtype, device=device)

    setup_module.load_model = load
    try:
        yield
    finally:
        setup_module.load_model = original


# --------------------------------------------------------------------------- measuring a phase


class PhaseMeter:
    """Seconds and peak tensor bytes of named phases: CUDA's allocator statistics, or on the
    CPU the live-tensor count (benchmarks/plan_check.LiveTensors) plus ``held()`` bytes."""

    def __init__(self, device: torch.device, held=lambda: 0):
        self.device, self.held, self.phases = device, held, {}

    def wrap(self, name: str, fn):
        """``fn`` measured as phase ``name`` at each call."""
        def measured(*args, **kwargs):
            with self.span(name):
                return fn(*args, **kwargs)
        return measured

    @contextmanager
    def span(self, name: str):
        """The block measured as phase ``name``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            yield
            torch.cuda.synchronize(self.device)
            seconds, peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated(self.device)
            # what the allocator holds from the driver: the allocated peak plus fragmentation
            reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            from benchmarks.plan_check import LiveTensors

            tracker, held = LiveTensors(), self.held()
            t0 = time.perf_counter()
            with tracker.mode:
                yield
            seconds, peak = time.perf_counter() - t0, held + tracker.peak
            reserved = None  # the CPU has no caching allocator to ask
        entry = self.phases.setdefault(name, {"seconds": 0.0, "peak_bytes": 0, "reserved_bytes": None, "calls": 0})
        entry["seconds"] += seconds
        entry["peak_bytes"] = max(entry["peak_bytes"], peak)
        if reserved is not None:
            entry["reserved_bytes"] = max(entry["reserved_bytes"] or 0, reserved)
        entry["calls"] += 1


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes per second of a device-to-device copy (read + write), best of 3."""
    n = int(gib * GB) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.zeros_like(src)  # touched: the first copy pays no page faults
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * n * 4 / best


# --------------------------------------------------------------------------- one recipe


def recipe_config(recipe: str, model_dir: Path, data: Path, work: Path, device: torch.device, extra=()):
    from grpo.config import load_config

    spec = RECIPES[recipe]
    overrides = [f"run.output_dir={work / ('run-' + recipe)}", "run.overwrite=true", f"model.path={model_dir}",
                 "model.build_tiny=false", f"data.train_path={data}", "data.format=synthetic", "data.eval_path=null",
                 "data.synthetic_generate=false", "data.prompt_template=2", "logging.progress_bar=false",
                 "logging.tensorboard=false", "logging.sample_every=0", "checkpointing.every=0",
                 "algorithm.format_warmup_steps=0", "algorithm.dynamic_sampling=false", "model.dtype=bfloat16",
                 *spec["overrides"], *(CPU_OVERRIDES if device.type == "cpu" else []), *extra]
    return load_config(ROOT / "configs" / spec["config"], overrides)


def layers_that_fit(recipe, shape, work, data, device, budget_bytes) -> tuple[int, object]:
    """The most decoder layers (of the shape's) whose plan fits ``budget_bytes``, and that plan."""
    from grpo.memory_plan import plan_memory

    top = SHAPES[shape].get("text_layers")
    if top is None:  # the tiny model: as it is
        return 0, None
    for layers in sorted({top, 24, 16, 8, 4, 2, 1}, reverse=True):
        if layers > top:
            continue
        model_dir = write_model_dir(shape, work / f"model-{layers}", text_layers=layers)
        cfg = recipe_config(recipe, model_dir, data, work, device)
        plan = plan_memory(cfg, world_size=1, device_type=device.type, audio_seconds=10.0)
        if plan.peak - plan.overhead <= budget_bytes:
            return layers, plan
    return -1, plan


@contextmanager
def process_group(device: torch.device):
    """A one-process group while the block runs (FSDP2 shards over one): what train.py sets up."""
    import torch.distributed as dist

    from models.distributed import cleanup, init_distributed

    if dist.is_initialized():
        yield
        return
    init_distributed(device=device.type)
    try:
        yield
    finally:
        cleanup()


def run_recipe(recipe: str, model_dir: Path, data: Path, work: Path, device: torch.device) -> dict:
    """One warm-up and one measured GRPO step of the recipe through the trainer, per phase
    (inside a one-process group: the full recipe shards with FSDP2)."""
    with process_group(device):
        return _run_recipe(recipe, model_dir, data, work, device)


def _run_recipe(recipe: str, model_dir: Path, data: Path, work: Path, device: torch.device) -> dict:
    from benchmarks.plan_check import tensor_bytes
    import grpo.step as grpo
    from grpo.memory_plan import plan_memory
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = recipe_config(recipe, model_dir, data, work, device)
    with random_weights():
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=device))
    # every completion runs to max_new_tokens: the end tokens are never sampled
    ends = trainer.sampling.end_token_ids
    trainer.sampling.suppress_token_ids = sorted(set(trainer.sampling.suppress_token_ids) | set(ends))
    meter = PhaseMeter(device, held=lambda: tensor_bytes(trainer))
    shapes = []
    originals = {name: getattr(grpo, name) for name in ("sample_round", "policy_update")}
    reference_policy = trainer.reference.policy

    def sample_round(ctx, step, round_):
        r = originals["sample_round"](ctx, step, round_)
        shapes.append((r.prompts["input_ids"].shape[1], r.ids.shape[1],
                       int(r.prompts["feature_attention_mask"].sum(-1).max()) / 100))
        return r

    @contextmanager
    def timed_reference():  # the block of the step that runs the reference pass
        with meter.span("reference"), reference_policy() as reference:
            yield reference

    try:
        trainer.grpo_step()  # warm-up: lazy initialisations, AdamW's state
        trainer.step += 1
        # the step's own stages, timed where the step calls them
        grpo.sample_round = meter.wrap("rollout", sample_round)
        trainer.reference.policy = timed_reference  # this object only: its class keeps its own
        grpo.policy_update = meter.wrap("update", originals["policy_update"])
        try:
            metrics = trainer.grpo_step()
        finally:
            for name, fn in originals.items():
                setattr(grpo, name, fn)
            del trainer.reference.policy
        trainer.step += 1
        eval_gap = decode = None
        if recipe == "lora":
            decode = decode_speed(trainer, device)
            eval_gap = eval_mode_gap(trainer)
    finally:
        trainer.close()
    P, T, seconds = max(s[0] for s in shapes), max(s[1] for s in shapes), max(s[2] for s in shapes)
    plan = plan_memory(cfg, world_size=1, device_type=device.type, prompt_tokens=P, completion_tokens=T,
                       audio_seconds=seconds)
    persistent = sum(plan.persistent.values())
    # the plan has no reference phase of its own (a no-grad pass, below the update's activations)
    planned = {"rollout": persistent + sum(plan.rollout.values()), "update": persistent + sum(plan.update.values())}
    phases = {}
    for name, entry in meter.phases.items():
        plan_bytes = planned.get(name)
        phases[name] = {"seconds": entry["seconds"], "peak_gb": entry["peak_bytes"] / GB,
                        "reserved_gb": None if entry["reserved_bytes"] is None else entry["reserved_bytes"] / GB,
                        "plan_gb": None if plan_bytes is None else plan_bytes / GB,
                        "plan_over_measured": None if plan_bytes is None else plan_bytes / entry["peak_bytes"]}
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "recipe": recipe, "config": RECIPES[recipe]["config"], "layers": cfg_layers(model_dir),
        "shape": {"B": cfg.rollout.prompts_per_step, "G": cfg.rollout.group_size, "P": P, "T": T,
                  "clip_seconds": seconds},
        "phases": phases, "step_seconds": sum(p["seconds"] for p in phases.values()),
        "plan_peak_tensors_gb": (plan.peak - plan.overhead) / GB,
        "measured_peak_gb": max(p["peak_gb"] for p in phases.values()),
        "sampler_logprob_diff": {"mean": metrics.get("train/sampler_logprob_diff/mean"),
                                 "max": metrics.get("train/sampler_logprob_diff/max")},
        "sampler_logprob_diff_eval_mode": eval_gap, "decode": decode,
    }


def cfg_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]


def kv_read_per_step(text_config, *, rows: int, positions: float, element_size: int) -> float:
    """Bytes of KV cache one decoding step reads: every layer's keys and values at every cached
    position of every row, rows x positions x layers x 2 x (KV heads x head size) x element size
    (``positions``: the mean over the timed steps, the prompt plus half the new tokens)."""
    c = text_config
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return rows * positions * c.num_hidden_layers * 2 * c.num_key_value_heads * head * element_size


def decode_speed(trainer, device, tokens: int = 64) -> dict:
    """Seconds per decoding step of G rows of one prompt, against the bandwidth floor: the
    trainer's decoder (its rollout.decoder and compile_decoder), and under "decoders" each of
    dynamic (transformers' growing cache), static eager and static compiled, interleaved."""
    from grpo.rollout import SamplingSettings, completion_seeds, prompt_batch, sample_completions

    if device.type == "cpu":
        tokens = 8
    G = trainer.cfg.rollout.group_size
    samples, waves = trainer.stream.take(1)
    prompts = prompt_batch(samples, waves, trainer.processor, 2, device)
    s = trainer.sampling
    model = trainer.model.eval()

    def timed(n, decoder=s.decoder, compiled=s.compile_decoder):
        settings = SamplingSettings(max_new_tokens=n, end_token_ids=s.end_token_ids, pad_token_id=s.pad_token_id,
                                    suppress_token_ids=s.suppress_token_ids, temperature=s.temperature,
                                    top_k=s.top_k, top_p=s.top_p, decoder=decoder, compile_decoder=compiled)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        sample_completions(model, prompts, settings, group_size=G, chunk_prompts=1,
                           row_seeds=completion_seeds(0, 0, 0, [0], G))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    one, many = timed(1), timed(tokens)
    per_step = (many - one) / (tokens - 1)
    lm = model.model.language_model
    read = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    read += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    kv = kv_read_per_step(model.config.text_config, rows=G, positions=prompts["input_ids"].shape[1] + tokens / 2,
                          element_size=next(lm.parameters()).element_size())
    bandwidth = copy_bandwidth(device, gib=1.0 if device.type == "cuda" else 0.25)
    floor = (read + kv) / bandwidth
    variants = {"dynamic": ("dynamic", False), "static": ("static", False)}
    if device.type == "cuda":  # compiling on the CPU takes minutes and does not pay there (benchmarks/RESULTS.md)
        variants["static_compiled"] = ("static", True)
    for decoder, compiled in variants.values():
        timed(2, decoder, compiled)  # warm-up (and compilation)
    steps = {name: [] for name in variants}
    for _ in range(2):  # interleaved
        for name, (decoder, compiled) in variants.items():
            steps[name].append((timed(tokens, decoder, compiled) - timed(1, decoder, compiled)) / (tokens - 1))
    decoders = {name: {"seconds_per_step": min(t), "tokens_per_second": G / min(t), "fraction_of_floor": floor / min(t)}
                for name, t in steps.items()}
    return {"rows": G, "seconds_per_step": per_step, "tokens_per_second": G / per_step,
            "weights_read_per_step_gb": read / GB, "kv_read_per_step_gb": kv / GB,
            "copy_bandwidth_gb_per_s": bandwidth / GB,
            "floor_seconds_per_step": floor, "floor_tokens_per_second": G / floor,
            "fraction_of_floor": floor / per_step, "decoders": decoders}


def eval_mode_gap(trainer) -> dict:
    from benchmarks.slice_check import sampler_gap
    from grpo.rollout import prompt_batch

    samples, waves = trainer.stream.take(1)
    prompts = prompt_batch(samples, waves, trainer.processor, 2, trainer.device)
    _, gap = sampler_gap(trainer.model.eval(), prompts, trainer.sampling, trainer.cfg.rollout.group_size)
    return gap


# --------------------------------------------------------------------------- report


def two_rank_straddle(work: Path, device: str = "cuda", timeout_s: float = 300) -> dict:
    """benchmarks/two_gpu_straddle.py on 2 local processes (NCCL on ``cuda``, gloo on ``cpu``):
    its result, or {"ok": False, "error": ...} when it failed, hung or wrote nothing."""
    import subprocess

    from models.tiny import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(work / "model-straddle", seed=0)
    out = work / "two_gpu_straddle.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.setdefault("OMP_NUM_THREADS", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "benchmarks" / "two_gpu_straddle.py"), "--model-dir", str(model_dir), "--out", str(out),
           "--device", device]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        log = f"killed after {timeout_s:.0f} s (a hang?) {err.stdout or ''}{err.stderr or ''}"
    for path in [out, *sorted(work.glob("two_gpu_straddle.json.rank*"))]:
        if path.exists():
            result = json.loads(path.read_text())
            if not result["ok"] or path == out:
                return result
    return {"ok": False, "error": log[-2000:]}


def gb(x: float) -> str:
    return f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def markdown(result: dict) -> str:
    lines = [f"# gpu_check: {result['device_name']}", "",
             f"torch {result['torch']}, transformers {result['transformers']}, {result['date']}; "
             f"shape {result['shape']}; device memory {result['device_memory_gb']:.1f} GB", "",
             "| recipe | layers | B x G x T (P) | phase | seconds | peak GB (measured) | reserved GB | plan GB "
             "| plan / measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["recipes"].values():
        if "skipped" in r:
            lines.append(f"| {r['recipe']} | - | - | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        sh = r["shape"]
        for name, ph in r["phases"].items():
            plan = "-" if ph["plan_gb"] is None else gb(ph["plan_gb"])
            ratio = "-" if ph["plan_over_measured"] is None else f"{ph['plan_over_measured']:.2f}"
            reserved = "-" if ph.get("reserved_gb") is None else gb(ph["reserved_gb"])
            lines.append(f"| {r['recipe']} | {r['layers']} | {sh['B']} x {sh['G']} x {sh['T']} ({sh['P']}) | {name} | "
                         f"{ph['seconds']:.2f} | {gb(ph['peak_gb'])} | {reserved} | {plan} | {ratio} |")
    lines.append("")
    lora = result["recipes"].get("lora", {})
    d = lora.get("decode")
    if d:
        lines.append(f"decode: {d['rows']} rows, {d['seconds_per_step'] * 1e3:.1f} ms per step = "
                     f"{d['tokens_per_second']:.0f} tokens/s; floor {d['floor_seconds_per_step'] * 1e3:.2f} ms "
                     f"({gb(d['weights_read_per_step_gb'])} GB of weights + {gb(d['kv_read_per_step_gb'])} GB of KV "
                     f"cache read at {d['copy_bandwidth_gb_per_s']:.0f} GB/s copy "
                     f"bandwidth) = {d['floor_tokens_per_second']:.0f} tokens/s; {100 * d['fraction_of_floor']:.0f} % "
                     f"of the floor")
        for name, v in d.get("decoders", {}).items():
            lines.append(f"decode ({name}): {v['seconds_per_step'] * 1e3:.1f} ms per step = "
                         f"{v['tokens_per_second']:.0f} tokens/s, {100 * v['fraction_of_floor']:.0f} % of the floor")
    for name, r in result["recipes"].items():
        g = r.get("sampler_logprob_diff")
        if g and g["mean"] is not None:
            e = r.get("sampler_logprob_diff_eval_mode")
            extra = f"; eval mode mean {e['mean']:.2e} max {e['max']:.2e}" if e else ""
            lines.append(f"sampler/trainer gap ({name}, bf16): mean {g['mean']:.2e} max {g['max']:.2e}{extra}")
    s = result.get("two_gpu_straddle")
    if s:
        if "skipped" in s:
            lines.append(f"two GPUs, FSDP2 update straddling the log-prob chunk: skipped ({s['skipped']})")
        elif s["ok"]:
            lines.append(f"two GPUs ({s['backend']}), FSDP2 update straddling the log-prob chunk on one rank: "
                         f"{s['updates']} updates in {s['seconds']:.2f} s, losses finite: {s['losses_finite']}")
        else:
            lines.append(f"two GPUs, FSDP2 update straddling the log-prob chunk: FAILED ({(s['error'].strip().splitlines() or [''])[-1]})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["lora", "full"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the JSON and markdown go")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="the plan must fit this (default: 90 %% of the GPU's memory; 8 GB on the CPU)")
    args = p.parse_args(argv)
    # the 24 GB recipe leaves about 2 GB: growable segments keep fragmentation from taking it
    # (read when CUDA's allocator starts, so before the first allocation; a user's setting wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing measured")
        return 2
    import transformers

    from benchmarks.slice_check import synthetic_data

    device = torch.device(args.device)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * GB
    budget = args.memory_budget_gb * GB if args.memory_budget_gb else 0.9 * total
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device_name": name, "device_memory_gb": total / GB, "shape": args.shape, "torch": torch.__version__,
              "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "recipes": {}}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = synthetic_data(work, clip_seconds=10.0 if args.shape != "tiny" else 2.0)
        for recipe in args.recipes:
            layers, plan = layers_that_fit(recipe, args.shape, work, data, device, budget)
            if layers < 0:
                need = (plan.peak - plan.overhead) / GB
                result["recipes"][recipe] = {"recipe": recipe, "skipped": f"the plan ({need:.1f} GB) exceeds "
                                             f"{budget / GB:.1f} GB even at 1 decoder layer"}
                print(f"{recipe}: skipped, {result['recipes'][recipe]['skipped']}")
                continue
            model_dir = work / f"model-{layers}" if layers else write_model_dir(args.shape, work / "model-tiny")
            r = run_recipe(recipe, model_dir, data, work, device)
            result["recipes"][recipe] = r
            print(f"{recipe}: {r['layers']} decoder layers, step {r['step_seconds']:.1f} s, peak "
                  f"{gb(r['measured_peak_gb'])} GB (plan {gb(r['plan_peak_tensors_gb'])} GB)")
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus >= 2:
            result["two_gpu_straddle"] = two_rank_straddle(work, "cuda")
            print(f"two GPUs: {result['two_gpu_straddle']}")
        else:
            result["two_gpu_straddle"] = {"skipped": f"needs 2 GPUs, {gpus} visible"}
    result["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gpu_check_{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
