"""The learning demo over many seeds: does `make train`'s recipe learn on every one?

Runs configs/tiny.yaml (or --config) once per seed, as separate `train.py` processes, several
at a time with one thread each, and writes a table: per seed the final held-out greedy
accuracy (overall and per task), the first step at >= 0.95, and the wall time. With --sft the
supervised baseline (`algorithm.name=sft`: the correct answer as the target) runs on the same
model, data and seeds for as many optimizer steps as the GRPO run takes (warm-up included),
so the two can be compared side by side.

    python benchmarks/seeds.py --seeds 0-9 --sft --jobs 2 \
        --json benchmarks/results/seeds-cpu.json --markdown benchmarks/results/seeds-cpu.md

Extra ``section.key=value`` arguments go to every run (e.g. ``rollout.group_size=16``).
The model and the synthetic data are built once, before the runs start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> 0..9; '0,3,5' -> [0, 3, 5]; '2-4,7' -> [2, 3, 4, 7]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def summarize(history: list[dict], tasks: list[str], threshold: float = 0.95) -> dict:
    """Final held-out accuracy, overall and per task, and the first step at >= threshold."""
    evals = [r for r in history if "eval/greedy_accuracy" in r]
    if not evals:
        return {"final": float("nan"), "tasks": {}, "first_step_at_threshold": None}
    first = next((r["step"] for r in evals if r["eval/greedy_accuracy"] >= threshold and r["train/phase"] == 1.0),
                 None)
    last = evals[-1]
    return {
        "final": last["eval/greedy_accuracy"],
        "tasks": {t: last.get(f"eval/greedy_accuracy/{t}", float("nan")) for t in tasks},
        "first_step_at_threshold": first,
        "warmup_end": next((r["eval/greedy_accuracy"] for r in reversed(evals) if r["train/phase"] == 0.0), None),
        "steps": last["step"],
    }


def run_one(name: str, seed: int, args, overrides: list[str], threads: int) -> dict:
    out = Path(args.root) / f"{name}-seed{seed}"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", args.config, f"run.seed={seed}",
           f"run.output_dir={out}", "logging.progress_bar=false", "logging.tensorboard=false",
           "checkpointing.export=false", "run.overwrite=true", *overrides]  # a rerun moves the old run aside
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    print(f"{name} seed {seed}: final {history[-1].get('eval/greedy_accuracy', float('nan')):.2f} "
          f"in {seconds:.0f} s", flush=True)
    return {"mode": name, "seed": seed, "seconds": seconds, "history": history}


def markdown(results: list[dict], tasks: list[str], header: str) -> str:
    lines = [header, "", "| mode | seed | final accuracy | " + " | ".join(tasks)
             + " | after warm-up | first step >= 0.95 | time (s) |",
             "|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]
    for r in results:
        s = r["summary"]
        warm = "-" if s.get("warmup_end") is None else f"{s['warmup_end']:.2f}"
        lines.append(f"| {r['mode']} | {r['seed']} | {s['final']:.2f} | "
                     + " | ".join(f"{s['tasks'][t]:.2f}" for t in tasks)
                     + f" | {warm} | {s['first_step_at_threshold'] or '-'} | {r['seconds']:.0f} |")
    lines.append("")
    for mode in dict.fromkeys(r["mode"] for r in results):
        finals = [r["summary"]["final"] for r in results if r["mode"] == mode]
        worst = {t: min(r["summary"]["tasks"][t] for r in results if r["mode"] == mode) for t in tasks}
        times = [r["seconds"] for r in results if r["mode"] == mode]
        lines.append(f"- {mode}: {sum(f >= 0.95 for f in finals)} of {len(finals)} seeds end >= 0.95; "
                     f"min {min(finals):.2f}, mean {statistics.mean(finals):.3f}; worst per task "
                     + ", ".join(f"{t} {v:.2f}" for t, v in worst.items())
                     + f"; median time {statistics.median(times):.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="runs at a time")
    p.add_argument("--sft", action="store_true", help="also run the supervised baseline on the same seeds")
    p.add_argument("--no-grpo", action="store_true", help="only the supervised baseline")
    p.add_argument("--root", default="runs/seeds", help="run directories go here")
    p.add_argument("--json", default=None, help="write every run's summary and history here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = p.parse_args(argv)
    os.chdir(REPO)
    from grpo.config import load_config
    from grpo.setup import prepare_data, prepare_model

    cfg = load_config(args.config, args.overrides)
    prepare_model(cfg)  # once, before the runs: concurrent runs must not build the same files
    prepare_data(cfg)
    tasks = list(cfg.data.synthetic_tasks) or sorted({json.loads(line).get("task") for line in
                                                      Path(cfg.data.train_path).read_text().splitlines()})
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    sft_steps = cfg.run.steps + (cfg.algorithm.format_warmup_steps if cfg.algorithm.name == "grpo" else 0)
    jobs = []
    for seed in parse_seeds(args.seeds):
        if not args.no_grpo:
            jobs.append(("grpo", seed, args.overrides))
        if args.sft or args.no_grpo:
            jobs.append(("sft", seed, [*args.overrides, "algorithm.name=sft", f"run.steps={sft_steps}"]))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(j[0], j[1], args, j[2], threads), jobs))
    wall = time.perf_counter() - t0
    for r in results:
        r["summary"] = summarize(r["history"], tasks)
    results.sort(key=lambda r: (r["mode"], r["seed"]))
    header = (f"{args.config} {' '.join(args.overrides)}".strip()
              + f": {len(jobs)} runs, {args.jobs} at a time with {threads} thread(s) each, on "
              f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), {date.today()}, "
              f"{wall:.0f} s in all")
    table = markdown(results, tasks, header)
    print(table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        for r in results:  # the eval rows are the curve; the per-step rows stay in the run directories
            r["history"] = [row for row in r["history"] if any(k.startswith("eval/") for k in row)]
        Path(args.json).write_text(json.dumps({"header": header, "tasks": tasks, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
