"""Golden runs: the same short training runs before and after a change, compared value by value.

    python benchmarks/golden.py run OUT_DIR            # the five short runs, one after another
    python benchmarks/golden.py compare BEFORE AFTER   # every logged value but timings equal,
                                                       # the exported weights byte-identical

The runs (the tiny model on CPU, a few dozen steps each): plain GRPO; mu = 2 (two policy
updates per rollout); dynamic sampling; LoRA; and the GRPO family's hooks together (CISPO,
RLOO advantages, each reward normalised alone, high-entropy tokens, soft overlong punishment,
importance-weighted KL, a reference that follows the policy). A refactor that keeps behaviour
leaves every logged scalar (history.jsonl and the TensorBoard events) and every byte of the
exported weights as they were. Timings, throughput and peak memory are left out: they measure
the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["run.steps=12", "algorithm.format_warmup_steps=60", "algorithm.format_warmup_lr=2e-3", "data.eval_every=8", "data.eval_samples=20",
          "data.synthetic_train_size=200", "data.synthetic_eval_size=20", "logging.sample_every=4",
          "logging.progress_bar=false", "checkpointing.every=8", "checkpointing.keep_last=2",
          "rollout.prompts_per_step=8", "algorithm.micro_batch_prompts=4"]

RUNS = {
    "plain": ("configs/tiny.yaml", ["algorithm.dynamic_sampling=false"]),
    "mu2": ("configs/tiny.yaml", ["algorithm.dynamic_sampling=false", "algorithm.mu=2"]),
    "dynamic": ("configs/tiny.yaml", ["algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2"]),
    "lora": ("configs/tiny_lora.yaml", ["algorithm.mu=2", "lora.dropout=0.1"]),
    "family": ("configs/tiny.yaml", [
        "algorithm.dynamic_sampling=false", "algorithm.mu=2", "algorithm.policy_loss_type=cispo",
        "algorithm.advantage_baseline=leave_one_out", "algorithm.reward_normalization=normalize_each",
        "algorithm.top_entropy_fraction=0.5", "algorithm.overlong_buffer=4", "algorithm.kl_importance_weighted=true",
        "algorithm.ref_sync_every=3", "algorithm.ref_sync_alpha=0.5", "algorithm.mask_truncated=true"]),
}

# measured by the machine, not computed by the run
NOT_COMPARED = ("timing/", "perf/")


def run_all(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    art = out / "artifacts"
    for name, (config, overrides) in RUNS.items():
        args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config),
                f"run.output_dir={out / name}", f"model.path={art / 'tiny-qwen2-audio'}",
                f"data.train_path={art / 'synthetic/train.jsonl'}", f"data.eval_path={art / 'synthetic/eval.jsonl'}",
                *COMMON, *overrides]
        print("golden run:", name, flush=True)
        subprocess.run(args, check=True, env=env, cwd=ROOT)


def scalars(run: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar the run logged: history.jsonl and the TensorBoard events."""
    values = {}
    for line in (run / "history.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                values[("history:" + key, row["step"])] = value
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            values[("tb:" + tag, event.step)] = event.value
    for tag in events.Tags().get("tensors", []):  # add_text: the sample completions
        for event in events.Tensors(tag):
            values[("tb-text:" + tag, event.step)] = repr(event.tensor_proto.string_val)
    return values


def weights(run: Path) -> dict[str, str]:
    """sha256 of every exported weight file (and LoRA adapter file), by path under the run."""
    files = sorted(p for p in run.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")
                   and p.parent.name in ("hf", "adapter"))
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def compare(before: Path, after: Path) -> int:
    problems, compared, files = [], 0, 0
    for name in RUNS:
        a, b = scalars(before / name), scalars(after / name)
        keys = {k for k in a.keys() | b.keys() if not k[0].split(":", 1)[1].startswith(NOT_COMPARED)}
        for key in sorted(keys):
            compared += 1
            if key not in a or key not in b:
                problems.append(f"{name}: {key} logged by one run only")
            elif a[key] != b[key] and not (a[key] != a[key] and b[key] != b[key]):  # NaN == NaN here
                problems.append(f"{name}: {key}: {a[key]!r} != {b[key]!r}")
        wa, wb = weights(before / name), weights(after / name)
        files += len(wa)
        if not wa:
            problems.append(f"{name}: no exported weights")
        if wa != wb:
            problems.append(f"{name}: exported weights differ: {sorted(set(wa.items()) ^ set(wb.items()))}")
    for line in problems[:40]:
        print(line)
    print(f"{len(RUNS)} runs, {compared} logged values compared, {files} weight files hashed: "
          + ("identical" if not problems else f"{len(problems)} differences"))
    return 1 if problems else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run_all(Path(sys.argv[2]).resolve())
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
