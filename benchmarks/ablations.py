"""Where ours' speed-up comes from: each optimisation of the trainer timed alone against the naive
way of doing the same work, on the same model, prompts and shapes as benchmarks/bench_step.py.

    encoder forward        prompt_embeddings on the B clips (then repeated G times) vs on the
                           B*G repeated clips (what model(**inputs) does), no gradients
    encoder fwd+bwd        the same with a backward through encoder and projector (the update)
    log-prob head fwd+bwd  on the same decoder output [N, P+T, H]: lm_head + fp32 log_softmax only
                           at the T completion positions, in chunks recomputed in backward
                           (models.policy), vs over all P+T positions at once (TRL 0.14)
    prefill                models.policy.generate with 1 new token: each prompt prefilled once and
                           its KV cache repeated G times, vs the B*G repeated prompts prefilled
    sampling               models.policy.generate for T tokens, counter-based Gumbel sampling
                           (row seeds: independent of batch, chunking and ranks) vs
                           torch.multinomial with one generator; the cost of the invariance
    encoder real frames    prompt_embeddings on the B clips, forward and backward: the encoder
                           over the batch's real frames (plus the convolutions' margin) vs over
                           the whole window (naive column: real_frames=False)
    shared prefix fwd+bwd  models.policy.policy_logprobs with gradients: each prompt through the
                           decoder once per group (block mask) vs once per completion (naive
                           column: shared_prefix=False); the encoder over real frames in both

    python -m benchmarks.ablations --model anchor --prompts 2 --group-size 8 --new-tokens 32 \
        --threads 1 --json benchmarks/results/cpu-anchor-ablations.json

(Run from the repository root with `-m`, so that `benchmarks` is importable; the project's
packages come from the editable install.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_step import BUILT_MODELS, checkpoint_setup, repeat_prompts, timed, write_json
from grpo.rollout import completion_seeds
from models.policy import embedding_inputs, generate, policy_logprobs, prompt_embeddings, token_logprobs


def head_ours(model, hidden, ids, P, temperature):
    """The trainer's head (models.policy.token_logprobs): rows at completion positions only,
    in chunks recomputed in backward."""
    N, T = ids.shape
    h = hidden[:, P - 1:P + T - 1].reshape(N * T, -1)
    return token_logprobs(model.lm_head, h, ids.reshape(-1), temperature=temperature, chunk_size=1024,
                          with_entropy=False).view(N, T)


def head_naive(model, hidden, input_ids, P, temperature):
    """TRL 0.14's _get_per_token_logps on the same decoder output."""
    logp = F.log_softmax(model.lm_head(hidden)[:, :-1].float() / temperature, dim=-1)  # [N, P+T-1, V]
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)[:, P - 1:]


def measure(device, fn, repeats):
    fn()  # warm-up
    runs = [timed(device, fn)[1:] for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), max(m for _, m in runs)


def ablate(setup, G, repeats, device):
    model, prompts, s = setup.model, setup.prompts, setup.settings
    B, P = prompts["input_ids"].shape
    N, T = B * G, s.max_new_tokens
    rep = repeat_prompts(prompts, G)
    seeds = completion_seeds(0, 0, 0, list(range(B)), G)
    gen = dict(end_token_ids=s.end_token_ids, pad_token_id=s.pad_token_id, suppress_token_ids=s.suppress_token_ids,
               temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    with torch.no_grad():
        embeds = prompt_embeddings(model, **embedding_inputs(prompts))  # [B, P, H]
    rows = {}

    def row(name, naive, ours, note):
        (tn, mn), (to, mo) = measure(device, naive, repeats), measure(device, ours, repeats)
        rows[name] = {"naive_s": tn, "ours_s": to, "speedup": tn / to, "naive_peak_gb": mn, "ours_peak_gb": mo,
                      "note": note}
        print(f"  {name}: naive {tn:.3f} s, ours {to:.3f} s, {tn / to:.2f}x", file=sys.stderr, flush=True)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    model.eval()
    row("encoder forward", no_grad(lambda: prompt_embeddings(model, **embedding_inputs(rep), real_frames=False)),
        no_grad(lambda: prompt_embeddings(model, **embedding_inputs(prompts), real_frames=False)
                .repeat_interleave(G, dim=0)),
        f"{N} vs {B} clips through the audio encoder")

    def enc_bwd(p, g, real_frames=True):
        def run():
            embeds = prompt_embeddings(model, **embedding_inputs(p), real_frames=real_frames)  # [B, P, H]
            embeds.repeat_interleave(g, dim=0).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    model.train()
    row("encoder fwd+bwd", enc_bwd(rep, 1, False), enc_bwd(prompts, G, False), f"{N} vs {B} clips, forward and backward")

    ids = torch.randint(0, model.config.text_config.vocab_size, (N, T), device=device)
    input_ids = torch.cat([rep["input_ids"], ids], dim=1)
    hidden = torch.randn(N, P + T, model.config.text_config.hidden_size, device=device, dtype=embeds.dtype,
                         requires_grad=True)

    def head(fn, *a):
        def run():
            fn(model, hidden, *a, P, s.temperature).sum().backward()
            hidden.grad = None
            model.zero_grad(set_to_none=True)
        return run

    row("log-prob head fwd+bwd", head(head_naive, input_ids), head(head_ours, ids),
        f"lm_head + fp32 log_softmax over {N} x {P + T - 1} vs {N} x {T} positions")
    model.eval()
    mask = prompts["attention_mask"]
    row("prefill (+1 token)",
        no_grad(lambda: generate(model, embeds.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0),
                                 max_new_tokens=1, row_seeds=seeds, **gen)),
        no_grad(lambda: generate(model, embeds, mask, group_size=G, max_new_tokens=1, row_seeds=seeds, **gen)),
        f"{N} vs {B} prompts of {P} tokens through the decoder")
    torch_gen = torch.Generator(device=device)
    row("sampling (T tokens)",
        no_grad(lambda: generate(model, embeds, mask, group_size=G, max_new_tokens=T,
                                 generator=torch_gen.manual_seed(0), **gen)),
        no_grad(lambda: generate(model, embeds, mask, group_size=G, max_new_tokens=T, row_seeds=seeds, **gen)),
        "naive = torch.multinomial, ours = counter-based Gumbel-max; below 1x = what the invariance costs")

    model.train()
    row("encoder real frames", enc_bwd(prompts, 1, real_frames=False), enc_bwd(prompts, 1),
        f"{B} clips: the whole window vs the real frames (longest clip + 2 frames)")

    def logprobs_bwd(shared):
        def run():
            policy_logprobs(model, prompts, ids, temperature=s.temperature, shared_prefix=shared).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    row("shared prefix fwd+bwd", logprobs_bwd(False), logprobs_bwd(True),
        f"decoder tokens {N} x ({P} + {T}) vs {B} x ({P} + {G} x {T}), encoder and head included")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | small | anchor | PATH")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    common = dict(n_prompts=args.prompts, clip_seconds=args.clip_seconds, device=device, dtype=dtype,
                  new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model in BUILT_MODELS:
            from models.tiny import build_tiny_checkpoint

            path = build_tiny_checkpoint(Path(tmp) / args.model, seed=0, **BUILT_MODELS[args.model])
            setup = checkpoint_setup(path, args.model, **common)
        else:
            setup = checkpoint_setup(args.model, args.model, **common)
    setup.model.requires_grad_(True)
    setup.model.model.audio_tower.embed_positions.requires_grad_(False)
    result = {"model": args.model, "description": setup.description, "device": str(device),
              "threads": torch.get_num_threads(),
              "shape": {"prompts": args.prompts, "group_size": args.group_size, "new_tokens": args.new_tokens,
                        "prompt_length": setup.prompts["input_ids"].shape[1]},
              "rows": ablate(setup, args.group_size, args.repeats, device)}
    print(f"\n{setup.description} | B={args.prompts} G={args.group_size} T={args.new_tokens} "
          f"P={result['shape']['prompt_length']}")
    print(f"{'what':24} {'naive s':>9} {'ours s':>9} {'speed-up':>9}  note")
    for name, r in result["rows"].items():
        print(f"{name:24} {r['naive_s']:9.3f} {r['ours_s']:9.3f} {r['speedup']:8.2f}x  {r['note']}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
