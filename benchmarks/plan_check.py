"""The memory plan (grpo/memory_plan.py) against measured peaks on the CPU, and LoRA against
full fine-tuning (step time and peak memory), at the tiny and anchor shapes.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/plan_check.py --shape tiny
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/plan_check.py --shape anchor --lora both
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/plan_check.py --shape slice --lora on --dtype both

How the CPU measurement is compared with the plan. The plan counts tensors (what
torch.cuda.max_memory_allocated measures on a GPU). On the CPU the equivalent is counted by
a dispatch mode (LiveTensors): the tensors alive before the measured steps (weights,
reference, optimizer state: counted directly) plus the highest total of the storages created
during a step and still alive at once. Peak RSS is printed too, minus the RSS measured
after the imports and before the model loads, but it also holds the allocator's cached pages,
the tokenizer, the audio clips and the libraries' own buffers, so it is not what the plan
predicts (see benchmarks/RESULTS.md).

The trainer runs as train.py would (one process, fsdp never, fp32), on GRPO steps (no
warm-up); the first step is not measured (lazy initialisations, AdamW creating its state).
The plan is computed for the shapes the steps actually had (P, T of the batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # configs/tiny.yaml as make train runs it (16 prompts x G = 4, 12 new tokens, one micro-batch)
    "tiny": dict(model=dict(), overrides=[], clip_seconds=None),
    # the CPU anchor of benchmarks/bench_step.py: hidden 256, 4 + 4 layers, 30 s window; 2 prompts x G = 8 x 32
    # tokens; 10 s clips (AVQA's length: prompts of ~340 tokens, as the step benchmark's)
    "anchor": dict(model=dict(text_hidden=256, text_layers=4, audio_hidden=256, audio_layers=4, audio_seconds=30),
                   overrides=["rollout.prompts_per_step=2", "rollout.group_size=8", "rollout.max_new_tokens=32",
                              "rollout.generation_batch_prompts=2", "rollout.top_k=50", "rollout.top_p=1.0",
                              "algorithm.micro_batch_prompts=2"], clip_seconds=10.0),
    # a slice of Qwen2-Audio-7B-Instruct (every width, the vocabulary of 156032, the special ids, the 30 s
    # window; 1 decoder + 1 encoder layer) at the LoRA 24 GB recipe's settings (r1_aqa_lora_24gb.yaml: rank
    # 16, beta 0.04, activation checkpointing, one prompt generated and trained at a time), scaled to a CPU:
    # 1 prompt x G = 4 x 32 new tokens, 10 s clips (AVQA's length)
    "slice": dict(config="r1_aqa_lora_24gb.yaml", slice=dict(text_layers=1, audio_layers=1),
                  overrides=["rollout.prompts_per_step=1", "rollout.group_size=4", "rollout.max_new_tokens=32",
                             "rollout.generation_batch_prompts=1", "algorithm.micro_batch_prompts=1",
                             "data.format=synthetic", "data.prompt_template=2", "optimizer.schedule=constant"],
                  clip_seconds=10.0),
}
ARCH_7B = ROOT / "configs" / "qwen2_audio_7b_random.yaml"


def build_model(shape: str, model_dir: Path, dtype: str = "bfloat16") -> Path:
    """The shape's checkpoint at ``model_dir`` (built when absent): the tiny builder's sizes, or
    the 7B slice (stored in bf16; a float32 run upcasts the same weights)."""
    import yaml

    from models.tiny import build_slice_checkpoint, build_tiny_checkpoint

    spec = SHAPES[shape]
    if not (model_dir / "config.json").is_file():
        if "slice" in spec:
            build_slice_checkpoint(model_dir, yaml.safe_load(ARCH_7B.read_text()), seed=0, dtype=torch.bfloat16,
                                   **spec["slice"])
        else:
            build_tiny_checkpoint(model_dir, seed=0, **spec.get("model", {}))
    return model_dir


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def tensor_bytes(trainer) -> int:
    """Bytes of the tensors the trainer holds between steps (weights, reference, AdamW state)."""
    from grpo.reference import FrozenCopy

    seen, total = set(), 0
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    if isinstance(trainer.reference, FrozenCopy):
        tensors += list(trainer.reference.copy.parameters()) + list(trainer.reference.copy.buffers())
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard: the storage this rank holds
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _plain_cpu(t) -> bool:
    """A CPU tensor with its own storage: not a tensor subclass such as FSDP2's DTensor, whose
    storage is its local shard's (seen when the shard's own ops run)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"


class LiveTensors:
    """Bytes of the tensor storages created while active and still alive, and their peak.

    A dispatch mode sees every op's outputs (forward, backward, optimizer); each new storage
    is remembered through a weak reference and counted until it is freed. The CPU has no
    max_memory_allocated; this is the same quantity, for tensors created inside the block.

    Storages are keyed by their data pointer (a slice of a tensor can come back as a second
    storage object over the same memory: counted once), so the dead ones are dropped before an
    op's outputs are registered, not after: the allocator often hands a storage freed since the
    previous op (a temporary, a saved activation, a gradient) straight back to the next one at
    the same address, and a dead entry still under that key would hide the new storage (its
    bytes not added) and then be subtracted, leaving the count short by it. How often the
    address is reused depends on the allocator's state, which differs from run to run, so that
    shortfall made the measured peak vary between runs of the same steps.

    An output that shares an input's storage (a view: a weight's transpose in every linear
    layer, a slice, a reshape; or an in-place op's result) is no allocation and is not counted:
    counting it would add a weight created before the step (the transposed [V, H] lm_head is
    1.2 GB at the 7B's vocabulary) to the step's peak.
    """

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live, self.current, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._prune()  # before registering: a new storage may sit at a freed one's address
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _plain_cpu(t)}
                for t in tree_leaves(out):
                    if _plain_cpu(t):
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker.live and key not in inputs:
                            tracker.live[key] = (StorageWeakRef(st), st.nbytes())
                            tracker.current += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self.mode = Mode()

    def _prune(self):
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]


def allocation_peak(fn) -> int:
    """Peak bytes of the tensors created while ``fn`` runs and alive at once (LiveTensors)."""
    tracker = LiveTensors()
    with tracker.mode:
        fn()
    return tracker.peak


def measure(shape: str, lora: bool, steps: int, work: Path, timed: int = 1, dtype: str | None = None,
            model_dir: Path | None = None) -> dict:
    """GRPO steps of the shape through the trainer (one process, fsdp never): the live-tensor
    peak against the plan, step times, and the metrics of the last step (the sampler/trainer gap
    among them). ``dtype``: model.dtype (default the shape's config's: float32 for tiny/anchor,
    bfloat16 for slice)."""
    import grpo.step as grpo_step_module
    from data.synthetic import generate_synthetic
    from grpo.config import load_config
    from grpo.memory_plan import plan_memory
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    spec = SHAPES[shape]
    model_dir = build_model(shape, model_dir or work / f"model-{shape}")
    data = work / f"data-{shape}"
    if not (data / "train.jsonl").is_file():
        extra = {"clip_seconds": spec["clip_seconds"]} if spec["clip_seconds"] else {}
        generate_synthetic(data, n=64, seed=0, tasks=["pitch", "tone_or_noise"], split="train", **extra)
    overrides = [f"run.output_dir={work / f'run-{shape}-{lora}'}", "run.overwrite=true", f"model.path={model_dir}",
                 "model.build_tiny=false", f"data.train_path={data / 'train.jsonl'}", "data.eval_path=null",
                 "data.synthetic_generate=false", "algorithm.format_warmup_steps=0", "distribution.fsdp=never",
                 "logging.progress_bar=false", "logging.tensorboard=false", "logging.sample_every=0",
                 "checkpointing.every=0",
                 # one rollout round, as the plan assumes (tiny.yaml's demo samples extra rounds)
                 "algorithm.dynamic_sampling=false", "algorithm.beta=0.04", *spec["overrides"]]
    if lora:
        overrides += ["lora.enabled=true", "lora.rank=16", "lora.alpha=32", "lora.dropout=0.05"]
    elif "slice" in spec:
        overrides += ["lora.enabled=false"]
    if dtype:
        overrides.append(f"model.dtype={dtype}")
    cfg = load_config(ROOT / "configs" / spec.get("config", "tiny.yaml"), overrides)
    baseline_rss = rss_gb()
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    shapes = []
    rollout = grpo_step_module.rollout

    def recording_rollout(ctx, step):  # the shapes the plan is computed for
        traj, record = rollout(ctx, step)
        seconds = int(traj.prompts["feature_attention_mask"].sum(-1).max()) / 100  # 100 mel frames per second
        shapes.append((traj.prompts["input_ids"].shape[1], traj.completion_ids.shape[1], seconds))
        return traj, record

    grpo_step_module.rollout = recording_rollout  # grpo_step looks it up in its module at each call
    last: dict = {}

    def step():
        last.update(trainer.train_step())

    try:
        step()  # the first step: AdamW creates its state, lazy initialisations
        held = tensor_bytes(trainer)
        times, peaks = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            peaks.append(allocation_peak(step))
            times.append(time.perf_counter() - t0)
        step_times = []
        for _ in range(timed):  # timed without the tracker
            t0 = time.perf_counter()
            step()
            step_times.append(time.perf_counter() - t0)
        step_s = sorted(step_times)[len(step_times) // 2] if step_times else float("nan")
        trainable = sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"])
    finally:
        grpo_step_module.rollout = rollout
        trainer.close()  # drops the model and optimizer
    P, T = max(s[0] for s in shapes), max(s[1] for s in shapes)
    seconds = max(s[2] for s in shapes)
    plan = plan_memory(cfg, world_size=1, device_type="cpu", prompt_tokens=P, completion_tokens=T,
                       audio_seconds=seconds)
    measured = held + max(peaks)
    return {
        "shape": shape, "lora": lora, "dtype": cfg.model.dtype, "P": P, "T": T,
        "trainable": trainable,
        "measured_tensor_peak_gb": measured / 2**30, "plan_peak_gb": plan.peak / 2**30,
        "plan_over_measured": plan.peak / measured,
        "held_between_steps_gb": held / 2**30,
        "step_seconds": step_s, "step_seconds_all": step_times,
        "rss_peak_minus_baseline_gb": rss_gb() - baseline_rss,
        "plan": plan.render(), "plan_parts_gb": {k: v / 2**30 for part in (plan.persistent, plan.rollout, plan.update)
                                                 for k, v in part.items()},
        "last_step_metrics": {k: v for k, v in last.items() if isinstance(v, float)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--lora", choices=["off", "on", "both"], default="off")
    p.add_argument("--dtype", choices=["config", "bfloat16", "float32", "both"], default="config",
                   help="model.dtype (config: the shape's config's)")
    p.add_argument("--model-dir", default=None, help="the shape's checkpoint (built here when absent)")
    p.add_argument("--steps", type=int, default=2, help="measured steps (after one unmeasured step)")
    p.add_argument("--timed", type=int, default=1, help="steps timed afterwards (the median is reported)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--show-plan", action="store_true")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        dtypes = {"config": [None], "both": ["bfloat16", "float32"]}.get(args.dtype, [args.dtype])
        for lora, dtype in [(lo, d) for lo in {"off": [False], "on": [True], "both": [False, True]}[args.lora]
                            for d in dtypes]:
            r = measure(args.shape, lora, args.steps, Path(tmp), timed=args.timed, dtype=dtype,
                        model_dir=Path(args.model_dir) if args.model_dir else None)
            results.append(r)
            gap = r["last_step_metrics"].get("train/sampler_logprob_diff/mean", float("nan"))
            print(f"{r['shape']:>6} lora={'on ' if lora else 'off'} {r['dtype']} P={r['P']} T={r['T']} "
                  f"trainable={r['trainable']:,}: measured tensor peak {r['measured_tensor_peak_gb'] * 1024:.1f} MB, "
                  f"plan {r['plan_peak_gb'] * 1024:.1f} MB (plan/measured {r['plan_over_measured']:.3f}); "
                  f"step {r['step_seconds']:.2f} s; sampler/trainer gap (mean) {gap:.2e}; "
                  f"peak RSS - baseline {r['rss_peak_minus_baseline_gb'] * 1024:.0f} MB")
            if args.show_plan:
                print(r["plan"])
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": "see benchmarks/RESULTS.md", "torch": torch.__version__,
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
