"""Two ranks, one FSDP2 policy update whose loss tokens straddle the lm_head chunk on one rank.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/two_gpu_straddle.py \
        --model-dir TINY_CHECKPOINT_DIR --out RESULT.json [--device cuda|cpu]

Run by benchmarks/gpu_check.py where two GPUs are visible (NCCL); ``--device cpu`` runs the same
on gloo. The real ``grpo.step.policy_update`` with a log-prob chunk of 8 rows and 2 rows per
micro-batch: rank 0's loss tokens end by column 2 (4 rows, 1 chunk if it kept its own width),
rank 1's run all 6 columns (12 rows, 2 chunks). Ranks whose chunk counts differed would issue
different collectives: NCCL hangs on that, so the collective timeout is bounded (60 s) and a
hang ends as an error. Two updates; rank 0 writes {"ok", "updates", "losses_finite", "seconds"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPTS_PER_RANK, GROUP, COMPLETION_LEN, CHUNK_ROWS = 2, 2, 6, 8


def prompts(processor, n: int) -> dict:
    """n chat prompts, each with a 1 s noise clip: input_ids [n, P], input_features [n, M, F], ..."""
    rng = np.random.default_rng(0)
    messages = [[{"role": "user", "content": [{"type": "audio", "audio_url": "clip.wav"},
                                              {"type": "text", "text": "What is the main sound source?"}]}]] * n
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    waves = [rng.standard_normal(16000).astype(np.float32) * 0.1 for _ in range(n)]
    out = processor(text=texts, audio=waves, sampling_rate=16000, return_tensors="pt", padding=True)
    return {k: out[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}


def straddling_update(model_dir: str, device: str) -> dict:
    from grpo.config import Config, advantage_spec, correction_spec, loss_spec
    from grpo.reference import NoReference
    from grpo.step import Counters, StepContext, StepSettings, Trajectory, policy_update
    from models import policy
    from models.distributed import shard_model
    from models.loading import load_model, load_processor

    rank, world = dist.get_rank(), dist.get_world_size()
    on = torch.device(f"cuda:{torch.cuda.current_device()}") if device == "cuda" else torch.device("cpu")
    cfg = Config()
    cfg.rollout.group_size, cfg.rollout.prompts_per_step = GROUP, PROMPTS_PER_RANK * world
    cfg.algorithm.micro_batch_prompts, cfg.algorithm.mu, cfg.algorithm.beta = 1, 1, 0.0
    cfg.model.logprob_chunk_rows = CHUNK_ROWS
    cfg.optimizer.lr, cfg.optimizer.warmup_steps = 1e-3, 0
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    policy.set_trainable(model)
    model = shard_model(model, device=on)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctx = StepContext(StepSettings.from_config(cfg), model, NoReference(), optimizer, processor=None, sampling=None,
                      stream=None, device=on, total_updates=2, loss=loss_spec(cfg), advantage=advantage_spec(cfg),
                      correction=correction_spec(cfg), rank=rank, world=world, fsdp=True)
    batch = {k: v.to(on) for k, v in prompts(load_processor(model_dir), PROMPTS_PER_RANK).items()}
    n = PROMPTS_PER_RANK * GROUP
    ids = torch.randint(10, 200, (n, COMPLETION_LEN), generator=torch.Generator().manual_seed(rank)).to(on)
    last = 2 if rank == 0 else COMPLETION_LEN  # rank 0: 1 chunk of its own; rank 1: 2
    mask = torch.arange(COMPLETION_LEN)[None, :] < torch.tensor([1, last] * PROMPTS_PER_RANK)[:, None]  # [n, T]
    mask = mask.to(on)
    total = mask.sum().reshape(1)
    dist.all_reduce(total)
    traj = Trajectory([None] * PROMPTS_PER_RANK, batch, ids, mask, torch.linspace(-1, 1, n, device=on), None, None,
                      int(total))
    counters, start = Counters(), time.perf_counter()
    for _ in range(2):
        record = policy_update(ctx, counters, traj)
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    return {"updates": counters.update, "losses_finite": bool(np.isfinite(record.losses).all()),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    from models.distributed import cleanup, init_distributed

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = p.parse_args()
    info = init_distributed(device=args.device, timeout_s=60.0)
    try:
        result = {"ok": True, "world": info.world_size, "backend": dist.get_backend(),
                  **straddling_update(args.model_dir, args.device)}
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()[-2000:]}
    if info.rank == 0 or not result["ok"]:
        Path(args.out if info.rank == 0 else f"{args.out}.rank{info.rank}").write_text(json.dumps(result, indent=2))
    cleanup()


if __name__ == "__main__":
    main()
