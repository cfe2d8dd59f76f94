"""Peak host memory per rank of loading a model for FSDP on 2 ranks: the whole model loaded on
every rank, then sharded (models.loading.load_model + models.distributed.shard_model), against
the model built on the meta device with each rank reading only its own rows
(models.distributed.load_sharded).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/load_memory.py --json runs/load_memory.json

A stand-in Qwen2-Audio (models.tiny.build_tiny_checkpoint's layout, widths set below, fp32
weights) on the CPU with gloo. Each rank reports VmHWM (the peak resident set, file pages of
the mmapped safetensors included) after importing torch and transformers and after loading;
the runs alternate between the two loaders, ``--repeats`` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(checkpoint: str, mode: str, out: str) -> None:
    import torch

    from models.distributed import cleanup, init_distributed, load_sharded, shard_model
    from models.loading import load_model

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    before = vm_hwm_mb()
    if mode == "whole":
        model = shard_model(load_model(checkpoint, dtype=torch.float32))
    else:
        model = load_sharded(checkpoint)
    local = sum(p.to_local().numel() for p in model.parameters())
    peak = vm_hwm_mb()
    Path(out, f"{mode}.rank{info.rank}.json").write_text(json.dumps(
        {"before_mb": before, "peak_mb": peak, "local_params": local}))
    del model
    cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, default=1536)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "MODE", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import torch

    from models.tiny import build_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="load_memory-"))
    ckpt = build_tiny_checkpoint(tmp / "ckpt", text_hidden=args.text_hidden, text_layers=args.text_layers,
                                 audio_hidden=256, audio_layers=2, vocab_size=args.vocab)
    from safetensors import safe_open
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        n_params = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    runs = []
    for repeat in range(args.repeats):
        for mode in ("whole", "shards") if repeat % 2 == 0 else ("shards", "whole"):
            out = Path(tempfile.mkdtemp(dir=tmp))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            __file__, "--worker", str(ckpt), mode, str(out)], env=env, check=True,
                           capture_output=True)
            ranks = [json.loads((out / f"{mode}.rank{r}.json").read_text()) for r in range(2)]
            runs.append({"mode": mode, "repeat": repeat, "ranks": ranks})
            print(mode, repeat, [(round(r["before_mb"]), round(r["peak_mb"])) for r in ranks], flush=True)
    summary = {"params": n_params, "fp32_mb": n_params * 4 / 2**20, "runs": runs}
    for mode in ("whole", "shards"):
        peaks = [r["peak_mb"] for run in runs if run["mode"] == mode for r in run["ranks"]]
        added = [r["peak_mb"] - r["before_mb"] for run in runs if run["mode"] == mode for r in run["ranks"]]
        summary[mode] = {"peak_mb_max": max(peaks), "added_mb_max": max(added), "added_mb_min": min(added)}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
