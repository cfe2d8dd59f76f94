"""Qwen2-Audio-7B-Instruct's real widths on the CPU: bf16 against fp32, the sampler/trainer
gap, and the export, on a slice of the architecture.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/slice_check.py --json runs/slice.json

The slice (models.tiny.build_slice_checkpoint): every width, head count, the vocabulary of
156032, the 128 mel bins, the 30 s window and the special-token ids of the real model
(configs/qwen2_audio_7b_random.yaml), 1 decoder and 1 encoder layer, random weights stored in
bf16 (1.5B parameters, 2.8 GB: the embeddings and lm_head are 1.28B of them). The settings are
the LoRA 24 GB recipe's (configs/r1_aqa_lora_24gb.yaml: rank 16, alpha 32, beta 0.04 with the
reference = adapters off, temperature 1, top-k 50) scaled to a CPU: 1 prompt with a 10 s clip,
G = 4, 32 new tokens. The memory plan against the measured peak at this shape is
benchmarks/plan_check.py --shape slice.

What it measures:

  precision   the same weights loaded in bf16 and in fp32, the same completions (sampled in
              bf16), the adapters' B set to random values N(0, 0.02^2) (so that they act), the
              log-probs of the completions, the GRPO loss (advantages +-1, the k3 KL to the
              adapters-off reference) and the adapters' gradients, fp32 against bf16
  gap         the sampler/trainer gap: the log-probs the rollout drew its tokens from (KV-cache
              decoding, grpo.rollout.sample_completions) against the log-probs the loss
              recomputes for them (one packed forward, models.policy.policy_logprobs), eval
              mode (no dropout), in fp32 and bf16: mean and max |difference| over the tokens
  export      one GRPO step through the trainer (bf16, LoRA); then the adapters' B set to
              N(0, 0.02^2) (a random model earns no reward signal in one step, so its adapters
              would stay at B = 0 and the merge would be the identity), the checkpoint saved
              and its export (adapters merged into the bf16 weights) loaded in plain
              transformers (Qwen2AudioForConditionalGeneration / AutoProcessor
              .from_pretrained): its greedy answer to a question (transformers' generate)
              against the trained slice's (the trainer's greedy path), token by token, and its
              log-probs of the trained slice's answer (plain forward) against the trainer's
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.plan_check import SHAPES, build_model  # noqa: E402
from benchmarks.bench_step import write_json  # noqa: E402

LORA = dict(rank=16, alpha=32, targets=["decoder"])


def synthetic_data(work: Path, clip_seconds: float = 10.0) -> Path:
    from data.synthetic import generate_synthetic

    path = work / "data" / "train.jsonl"
    if not path.is_file():
        generate_synthetic(path.parent, n=8, seed=0, tasks=["pitch", "tone_or_noise"], split="train",
                           clip_seconds=clip_seconds)
    return path


def one_prompt(model_dir: Path, data: Path, device="cpu"):
    """The processor's batch of the first question (one prompt), its Sample and the processor."""
    from data.audio import AudioLoader
    from data.datasets import read_dataset
    from grpo.rollout import prompt_batch
    from models.loading import load_processor

    processor = load_processor(model_dir)
    sample = read_dataset("synthetic", data)[0]
    wave = AudioLoader(max_seconds=processor.feature_extractor.chunk_length)(sample.audio_path)
    return prompt_batch([sample], [wave], processor, 2, device), sample, processor


def lora_model(model_dir: Path, dtype: torch.dtype, device="cpu", b_std: float = 0.0):
    """The checkpoint in ``dtype`` with the recipe's adapters (seeded A; B = 0, or N(0, b_std^2)
    seeded, so that the adapters act), eval mode."""
    from models.loading import load_model
    from models.lora import apply_lora

    model = load_model(model_dir, dtype=dtype, device=device)
    apply_lora(model, dropout=0.0, seed=0, **LORA)
    if b_std:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model.eval()


def masked_abs_stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()[mask]
    return {"mean": d.mean().item(), "max": d.max().item(), "tokens": int(d.numel())}


def sampler_gap(model, prompts, settings, G: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Sample G completions (the trainer's sampler, per-row seeds) and compare the sampler's
    log-probs with the packed forward's on them (eval mode). Returns the ids [G, T] and the stats."""
    from grpo.algorithm import completion_mask
    from grpo.rollout import completion_seeds, sample_completions
    from models.policy import policy_logprobs

    with torch.no_grad():
        ids, sampled = sample_completions(model, prompts, settings, group_size=G, chunk_prompts=1,
                                          row_seeds=completion_seeds(seed, 0, 0, [0], G), return_logprobs=True)
        loss_side = policy_logprobs(model, prompts, ids, temperature=settings.temperature)
    mask = completion_mask(ids, settings.end_token_ids)
    return ids, masked_abs_stats(sampled, loss_side, mask)


def loss_and_grads(model, prompts, ids, settings, beta: float = 0.04):
    """log-probs [N, T], the GRPO loss (advantages alternating +1 / -1, k3 KL to the adapters-off
    reference, the recipe's normalisation) and the adapters' gradients (fp32, by name)."""
    from grpo.algorithm import LossSpec, completion_mask, policy_loss
    from models.lora import adapters_disabled
    from models.policy import policy_logprobs

    mask = completion_mask(ids, settings.end_token_ids)
    N = ids.shape[0]
    advantages = torch.tensor([1.0, -1.0] * (N // 2) + [1.0] * (N % 2), device=ids.device)
    with torch.no_grad(), adapters_disabled(model):
        ref = policy_logprobs(model, prompts, ids, temperature=settings.temperature)
    model.zero_grad(set_to_none=True)
    logp = policy_logprobs(model, prompts, ids, temperature=settings.temperature)
    spec = LossSpec(beta=beta, loss_type="grpo", max_completion_length=settings.max_new_tokens)
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, spec, ref_logp=ref, total_sequences=N,
                          total_tokens=int(mask.sum()))
    loss.backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach().float().cpu(), loss.item(), grads, mask.cpu()


def gradient_difference(low: dict, high: dict) -> dict:
    """||g_low - g_high|| / ||g_high|| over all adapters, the largest per tensor, and the cosine."""
    keys = sorted(high)
    a = torch.cat([low[k].flatten().double() for k in keys])
    b = torch.cat([high[k].flatten().double() for k in keys])
    per = [((low[k].double() - high[k].double()).norm() / high[k].double().norm().clamp(min=1e-30)).item()
           for k in keys if high[k].abs().sum() > 0]
    return {"relative_l2": ((a - b).norm() / b.norm()).item(), "max_relative_per_tensor": max(per),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(), "tensors": len(keys)}


def precision_and_gap(model_dir: Path, prompts, settings, G: int, device="cpu") -> dict:
    """bf16 against fp32 on the same weights and completions; the sampler/trainer gap in each."""
    out = {}
    runs = {}
    ids = None
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        model = lora_model(model_dir, dtype, device, b_std=2e-2)
        t0 = time.perf_counter()
        own_ids, gap = sampler_gap(model, prompts, settings, G)
        out[f"gap_{name}"] = gap
        ids = own_ids if ids is None else ids  # the completions sampled in bf16, scored in both
        runs[name] = loss_and_grads(model, prompts, ids, settings)
        out[f"seconds_{name}"] = time.perf_counter() - t0
        del model
        gc.collect()
    (lp16, loss16, g16, mask), (lp32, loss32, g32, _) = runs["bfloat16"], runs["float32"]
    out["logprobs"] = masked_abs_stats(lp16, lp32, mask)
    out["loss"] = {"bfloat16": loss16, "float32": loss32, "abs_diff": abs(loss16 - loss32),
                   "relative": abs(loss16 - loss32) / max(abs(loss32), 1e-30)}
    out["gradients"] = gradient_difference(g16, g32)
    out["shape"] = {"G": G, "T": int(ids.shape[1]), "P": int(prompts["input_ids"].shape[1])}
    return out


def export_check(model_dir: Path, data: Path, work: Path, new_tokens: int = 16) -> dict:
    """One GRPO step through the trainer (bf16, LoRA), its export loaded in plain transformers;
    the greedy answers of both to the first question, and the exported model's weights' dtype."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from data.audio import AudioLoader
    from data.collate import collate_prompts
    from data.datasets import read_dataset
    from grpo.config import load_config
    from grpo.rollout import greedy_answers, prompt_batch
    from grpo.trainer import Trainer
    from models.distributed import DistInfo
    from models.policy import policy_logprobs

    spec = SHAPES["slice"]
    overrides = [f"run.output_dir={work / 'run-export'}", "run.overwrite=true", f"model.path={model_dir}",
                 f"data.train_path={data}", "data.eval_path=null", "distribution.fsdp=never",
                 "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_every=0",
                 "checkpointing.every=0", "checkpointing.export=true", *spec["overrides"],
                 "rollout.group_size=2", f"rollout.max_new_tokens={new_tokens}", "model.dtype=bfloat16"]
    cfg = load_config(ROOT / "configs" / spec["config"], overrides)
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    sample = read_dataset("synthetic", data)[0]
    wave = AudioLoader(max_seconds=trainer.processor.feature_extractor.chunk_length)(sample.audio_path)
    try:
        metrics = trainer.grpo_step()
        trainer.step += 1
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # adapters that act (see the module's docstring)
            for name, p in sorted(trainer.model.named_parameters()):
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        path = trainer.save()
        trainer.model.eval()
        with torch.no_grad():
            trained = greedy_answers(trainer.model, trainer.processor, [sample], [wave], trainer.sampling, template=2,
                                     device=torch.device("cpu"), batch_prompts=1)[0]
            prompts = prompt_batch([sample], [wave], trainer.processor, 2, torch.device("cpu"))
            trained_logp = policy_logprobs(trainer.model, prompts, trained[None]).float()[0]  # [T]
        settings = trainer.sampling
    finally:
        trainer.close()
    del trainer
    gc.collect()
    export = path / "hf"
    plain = Qwen2AudioForConditionalGeneration.from_pretrained(export, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(export)
    batch = collate_prompts([sample], [wave], processor, template=2)
    P = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = plain.generate(**batch, max_new_tokens=new_tokens, do_sample=False, eos_token_id=settings.end_token_ids,
                             pad_token_id=settings.pad_token_id, suppress_tokens=settings.suppress_token_ids)
        # the plain forward's log-probs of the trained slice's answer
        ids = torch.cat([batch["input_ids"], trained[None]], dim=1)
        logits = plain(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=batch["input_features"],
                       feature_attention_mask=batch["feature_attention_mask"]).logits[0, P - 1:-1].float()
        plain_logp = torch.log_softmax(logits, -1).gather(-1, trained[:, None]).squeeze(-1)
    answer = out[0, P:]
    n = min(len(answer), len(trained))
    same = int((answer[:n] == trained[:n]).cumprod(0).sum())
    diff = (plain_logp - trained_logp).abs()
    return {"export": str(export), "trained_tokens": trained.tolist(), "plain_transformers_tokens": answer.tolist(),
            "identical_prefix_tokens": same, "compared_tokens": n, "distinct_tokens": len(set(trained.tolist())),
            "logprob_abs_diff": {"mean": diff.mean().item(), "max": diff.max().item()},
            "exported_dtype": str(next(plain.parameters()).dtype),
            "step_metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="the slice's checkpoint (built here when absent)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], choices=["precision", "export"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from grpo.rollout import sampling_settings
    from models.loading import load_generation_config

    result = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model("slice", Path(args.model_dir) if args.model_dir else work / "slice")
        data = synthetic_data(work)
        if "precision" not in args.skip:
            prompts, _, processor = one_prompt(model_dir, data)
            settings = sampling_settings(processor.tokenizer, load_generation_config(model_dir),
                                         max_new_tokens=args.new_tokens, temperature=1.0, top_k=50, top_p=1.0)
            result["precision"] = r = precision_and_gap(model_dir, prompts, settings, args.group_size)
            print(f"slice P={r['shape']['P']} G={r['shape']['G']} T={r['shape']['T']}: bf16 vs fp32 log-probs "
                  f"mean {r['logprobs']['mean']:.2e} max {r['logprobs']['max']:.2e}; "
                  f"loss {r['loss']['bfloat16']:.4e} vs {r['loss']['float32']:.4e} "
                  f"(rel {r['loss']['relative']:.2e}); adapter gradients rel L2 "
                  f"{r['gradients']['relative_l2']:.2e}, cosine {r['gradients']['cosine']:.5f}")
            for name in ("float32", "bfloat16"):
                g = r[f"gap_{name}"]
                print(f"  sampler/trainer gap {name}: mean {g['mean']:.2e} max {g['max']:.2e} "
                      f"over {g['tokens']} tokens")
        if "export" not in args.skip:
            result["export"] = e = export_check(model_dir, data, work)
            print(f"export: plain transformers' greedy answer equals the trained slice's on "
                  f"{e['identical_prefix_tokens']} of {e['compared_tokens']} tokens ({e['distinct_tokens']} distinct; "
                  f"{e['exported_dtype']}); its log-probs of that answer differ by mean "
                  f"{e['logprob_abs_diff']['mean']:.2e} max {e['logprob_abs_diff']['max']:.2e}")
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
