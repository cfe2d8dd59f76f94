"""Rollout decode rate: the static-cache decoder against the dynamic one, interleaved, beside the
machine's floor.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.decode_rate --threads 1 --repeats 3 \
        --json benchmarks/results/cpu-decode-rate.json

Shapes (--shapes, any of):
  anchor       the CPU anchor of bench_step.py (5.4M parameters, 10 s clips), 2 prompts x G = 8
               x 32 new tokens, every completion 32 tokens long (the end tokens suppressed)
  spread       the anchor at R1-AQA's completion length, 2 x 8 x 256, completions ending at
               spread lengths: the end token's probability is set to 1/96 at every step (a
               geometric length, capped at 256), sampled with the same row seeds by both decoders
  tiny         the test model, 2 x 3 x 6 with ends (a smoke test of this script)
  slice        Qwen2-Audio-7B's real widths (models.tiny.build_slice_checkpoint: hidden 4096,
               32 heads, 32 key/value heads, the 156032 vocabulary; 1 decoder layer), bf16,
               1 prompt x G = 4 x 16 tokens

What is timed: ``models.policy.generate`` from the prompt embeddings (prefill + decode, the
rollout's sampling call) with decoder="dynamic" (transformers' growing cache) and "static"
(the default: each prompt's KV once per group), and the static decoder with G copies of the
prompt's KV (``models.decoding.generate_static(shared_prompt=False)``), each in turn, `repeats` times, interleaved; and once with
max_new_tokens = 1 (the prefill and the first token), whose time is taken off to give the decode
steps' rate: decode tokens per second = (generated tokens - one per row) / (t(T) - t(1)).
Both decoders must produce the same tokens (checked on every repeat).

The floor of a decode step: it must read the decoder's weights and the output head once, each
prompt's keys and values once and each live row's own so far (bytes / the measured memory
bandwidth), and do
2 x rows x (decoder + head) parameters of multiply-adds plus the attention's (FLOPs / the
measured matmul rate); the step takes at least the larger of the two. Summed over the steps
with the rows that are really still decoding, that is the least time the decode can take on
this machine; its tokens per second is the floor's rate. Bandwidth: a copy of a 256 MB
tensor (read + write bytes / time); matmul rate: a [rows, hidden] x [hidden, 4 hidden] product
at the shape's width, in its dtype (the decode step's own kind of matmul), both timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_step import BUILT_MODELS, checkpoint_setup, write_json  # noqa: E402
from grpo.rollout import SamplingSettings, completion_seeds  # noqa: E402
from models.decoding import generate_static  # noqa: E402
from models.policy import embedding_inputs, generate, prompt_embeddings, text_decoder  # noqa: E402

SHAPES = {
    "anchor": dict(model="anchor", prompts=2, group=8, tokens=32, ends=False, dtype=torch.float32),
    "spread": dict(model="anchor", prompts=2, group=8, tokens=256, ends=True, dtype=torch.float32),
    "slice": dict(model="slice", prompts=1, group=4, tokens=16, ends=False, dtype=torch.bfloat16),
    "tiny": dict(model="tiny", prompts=2, group=3, tokens=6, ends=True, dtype=torch.float32),  # the tests'
}
END_PROBABILITY = 1 / 96


def memory_bandwidth(device, mb=256, repeats=5):
    """Bytes per second of a large copy (read + write)."""
    x = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def matmul_rate(device, rows, hidden, dtype, repeats=5):
    """FLOPs per second of [rows, hidden] x [hidden, 4 hidden], the decode step's kind of product."""
    a = torch.randn(rows, hidden, dtype=dtype, device=device)
    w = torch.randn(4 * hidden, hidden, dtype=dtype, device=device)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(a, w)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * rows * hidden * 4 * hidden / best


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_floor(model, steps, bandwidth, flops_rate):
    """Least seconds of the decode steps: per step max(bytes / bandwidth, FLOPs / rate), summed.

    steps[t] = (rows fed at step t, keys each attends to, keys whose KV must be read at step t:
    the prompts' once per group plus every row's own).
    """
    lm = text_decoder(model)
    c = lm.config
    decoder_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    head_params = model.lm_head.weight.numel()
    bytes_per = next(lm.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_key = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * bytes_per  # K and V, every layer
    total = 0.0
    for rows, keys, kv_keys in steps:
        weight_bytes = (decoder_params + head_params) * bytes_per
        kv_bytes = kv_keys * kv_per_key
        flops = 2 * rows * (decoder_params + head_params) \
            + 4 * rows * keys * c.num_hidden_layers * c.num_attention_heads * head_dim
        total += max((weight_bytes + kv_bytes) / bandwidth, flops / flops_rate)
    return total


def build(shape, tmp, device):
    from models.tiny import build_slice_checkpoint, build_tiny_checkpoint

    spec = SHAPES[shape]
    if spec["model"] == "slice":
        import yaml

        arch = yaml.safe_load((ROOT / "configs" / "qwen2_audio_7b_random.yaml").read_text())
        path = build_slice_checkpoint(Path(tmp) / "slice", arch, text_layers=1, audio_layers=1, dtype=spec["dtype"])
    else:
        path = build_tiny_checkpoint(Path(tmp) / spec["model"], seed=0, **BUILT_MODELS[spec["model"]])
    setup = checkpoint_setup(path, shape, n_prompts=spec["prompts"], clip_seconds=10.0, device=device,
                             dtype=spec["dtype"], new_tokens=spec["tokens"], top_k=50)
    s = setup.settings
    if spec["ends"]:  # the end tokens may be drawn again (checkpoint_setup suppresses them)
        s = SamplingSettings(max_new_tokens=s.max_new_tokens, end_token_ids=s.end_token_ids,
                             pad_token_id=s.pad_token_id,
                             suppress_token_ids=[i for i in s.suppress_token_ids if i not in s.end_token_ids],
                             temperature=1.0, top_k=0, top_p=1.0)
    return setup.model.eval(), setup.prompts, s, spec


def end_at_spread_lengths(model, end_id):
    """The end token's probability set to END_PROBABILITY at every step, whatever the row
    (logit = logsumexp of the others + log(p / (1 - p)))."""
    import math

    def hook(module, args, out):
        others = out.float().clone()
        others[..., end_id] = float("-inf")
        level = others.logsumexp(-1) + math.log(END_PROBABILITY / (1 - END_PROBABILITY))
        out = out.clone()
        out[..., end_id] = level.to(out.dtype)
        return out
    return model.lm_head.register_forward_hook(hook)


def run_shape(shape, args, device):
    with tempfile.TemporaryDirectory() as tmp:
        model, prompts, s, spec = build(shape, tmp, device)
    G = spec["group"]
    hook = end_at_spread_lengths(model, s.end_token_ids[0]) if spec["ends"] else None
    with torch.no_grad():
        embeds = prompt_embeddings(model, **embedding_inputs(prompts))  # [B, P, H]
    mask = prompts["attention_mask"]
    B, P = mask.shape
    N = B * G
    seeds = completion_seeds(0, 0, 0, list(range(B)), G)
    kw = dict(max_new_tokens=s.max_new_tokens, end_token_ids=s.end_token_ids, pad_token_id=s.pad_token_id,
              suppress_token_ids=s.suppress_token_ids, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
              group_size=G, row_seeds=seeds, return_logprobs=True)
    decoders = {"dynamic": dict(decoder="dynamic"), "static": dict(decoder="static"),
                "static_g_copies": dict(shared_prompt=False)}
    if args.compile:
        decoders["static_compiled"] = dict(decoder="static", compile_step=True)

    def call(T, opts):
        _sync(device)
        t0 = time.perf_counter()
        fn = generate_static if "shared_prompt" in opts else generate
        out = fn(model, embeds, mask, **{**kw, "max_new_tokens": T}, **opts)
        _sync(device)
        return out, time.perf_counter() - t0

    for opts in decoders.values():  # warm-up (and the compilation)
        call(s.max_new_tokens, opts)
    times = {name: {"full": [], "first": []} for name in decoders}
    reference = None
    for _ in range(args.repeats):
        for name, opts in decoders.items():
            (ids, logp), seconds = call(s.max_new_tokens, opts)
            _, first = call(1, opts)
            times[name]["full"].append(seconds)
            times[name]["first"].append(first)
            if reference is None:
                reference = (ids, logp)
            elif not torch.equal(ids, reference[0]):
                raise RuntimeError(f"{shape}: decoder {name} sampled other tokens than {list(decoders)[0]}")
            else:
                torch.testing.assert_close(logp, reference[1], atol=1e-3 if spec["dtype"] != torch.float32 else 1e-5,
                                           rtol=0)
    if hook is not None:
        hook.remove()
    ids = reference[0]
    ends = torch.isin(ids, torch.tensor(s.end_token_ids))
    T = ids.shape[1]
    first_end = torch.where(ends, torch.arange(T), T).min(-1).values
    lengths = torch.where(first_end < T, first_end + 1, T)  # [N]
    generated = int(lengths.sum())
    # decode step t (t >= 1) feeds the token drawn at t - 1 of every row still open, against P + t keys;
    # the KV that must be read: each prompt's once (its real tokens) and each open row's own t
    real = int(mask.sum())
    live = []
    for t in range(1, T):
        rows = max(1, int((lengths > t).sum()))
        live.append((rows, real // B + t, real + rows * t))
    width = model.config.text_config.hidden_size
    bandwidth = memory_bandwidth(device)
    rate = matmul_rate(device, N, width, spec["dtype"])
    floor = decode_floor(model, live, bandwidth, rate)
    decode_tokens = generated - N
    result = {"shape": {"prompts": B, "group_size": G, "max_new_tokens": s.max_new_tokens, "prompt_length": P,
                        "dtype": str(spec["dtype"]).replace("torch.", ""),
                        "parameters": sum(p.numel() for p in model.parameters())},
              "generated_tokens": generated, "completion_lengths": sorted(lengths.tolist()),
              "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflop_s": rate / 1e9,
              "floor_decode_seconds": floor, "floor_decode_tokens_per_s": decode_tokens / floor, "decoders": {}}
    for name, t in times.items():
        full, first = statistics.median(t["full"]), statistics.median(t["first"])
        result["decoders"][name] = {
            "seconds": full, "all_seconds": t["full"], "prefill_and_first_token_seconds": first,
            "tokens_per_s": generated / full, "decode_tokens_per_s": decode_tokens / max(full - first, 1e-9),
            "decode_over_floor": (full - first) / floor}
    base = result["decoders"]["dynamic"]
    for name, r in result["decoders"].items():
        r["decode_speedup_vs_dynamic"] = (base["seconds"] - base["prefill_and_first_token_seconds"]) / max(
            r["seconds"] - r["prefill_and_first_token_seconds"], 1e-9)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["anchor", "spread"], choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="also time the static decoder with its step compiled")
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()})",
               "torch": torch.__version__, "load_average_at_start": os.getloadavg()[0], "shapes": {}}
    for shape in args.shapes:
        results["shapes"][shape] = r = run_shape(shape, args, device)
        write_json(results, args.json)
        print(f"{shape}: {r['generated_tokens']} tokens; floor {r['floor_decode_tokens_per_s']:.0f} decode tok/s "
              f"({r['memory_bandwidth_gb_s']:.1f} GB/s, {r['matmul_gflop_s']:.1f} GFLOP/s)")
        for name, d in r["decoders"].items():
            print(f"  {name:16} {d['seconds']:.3f} s  {d['decode_tokens_per_s']:8.0f} decode tok/s  "
                  f"x{d['decode_speedup_vs_dynamic']:.2f} vs dynamic  {d['decode_over_floor']:.1f}x the floor")
    results["load_average_at_end"] = os.getloadavg()[0]
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
