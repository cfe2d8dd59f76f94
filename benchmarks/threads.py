"""Step time of the `make train` demo against the CPU thread settings, idle and under load.

    .venv/bin/python benchmarks/threads.py --repeats 3 --json benchmarks/results/cpu-tiny-threads.json

Each run is configs/tiny.yaml cut short (``--warmup`` format warm-up steps, then ``--grpo``
GRPO steps, no evaluation until the end), in a fresh process with one setting of
``OMP_NUM_THREADS`` (torch's intra-op threads) and ``OMP_WAIT_POLICY`` (whether an idle
OpenMP thread spins or sleeps). "loaded" runs the same with ``--busy`` processes spinning
beside it, as a laptop's other work would. The settings and the two conditions are
interleaved (one run of each per repeat, in a rotating order), so a change in the machine's
other load falls on every setting alike. The first step of each phase is left out (its
one-off set-up), the rest give a median ``timing/step`` per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = [("1", "default"), ("1", "passive"), ("2", "default"), ("2", "passive")]


def run_once(threads: str, policy: str, out: Path, warmup: int, grpo: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = threads
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/tiny.yaml"),
           f"run.output_dir={out}", f"run.steps={grpo}", f"algorithm.format_warmup_steps={warmup}",
           "data.eval_every=0", "data.eval_samples=8", "logging.sample_every=0", "logging.progress_bar=false",
           "logging.tensorboard=false", "checkpointing.export=false",
           f"model.path={ROOT / 'artifacts/tiny-qwen2-audio'}",
           f"data.train_path={ROOT / 'artifacts/synthetic/train.jsonl'}",
           f"data.eval_path={ROOT / 'artifacts/synthetic/eval.jsonl'}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    warm = [r["timing/step"] for r in rows if r["step"] <= warmup][1:]
    rl = [r["timing/step"] for r in rows if r["step"] > warmup][1:]
    return {"warmup_s": statistics.median(warm), "grpo_s": statistics.median(rl), "wall_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--grpo", type=int, default=6)
    p.add_argument("--busy", type=int, default=2, help="spinning processes in the loaded condition")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for rep in range(args.repeats):
            for condition in ("idle", "loaded"):
                busy = []
                if condition == "loaded":
                    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.busy)]
                try:
                    order = SETTINGS[rep % len(SETTINGS):] + SETTINGS[:rep % len(SETTINGS)]
                    for threads, policy in order:
                        n += 1
                        r = run_once(threads, policy, Path(tmp) / f"run{n}", args.warmup, args.grpo)
                        r.update(repeat=rep, condition=condition, threads=int(threads), wait_policy=policy,
                                 load_average=os.getloadavg()[0])
                        results.append(r)
                        print(json.dumps(r), flush=True)
                finally:
                    for proc in busy:
                        proc.kill()
                        proc.wait()

    summary = {}
    for condition in ("idle", "loaded"):
        for threads, policy in SETTINGS:
            rs = [r for r in results if r["condition"] == condition and r["threads"] == int(threads)
                  and r["wait_policy"] == policy]
            summary[f"{condition} threads={threads} wait={policy}"] = {
                "warmup_s": [round(r["warmup_s"], 3) for r in rs],
                "grpo_s": [round(r["grpo_s"], 3) for r in rs],
                "warmup_median_s": round(statistics.median(r["warmup_s"] for r in rs), 3),
                "grpo_median_s": round(statistics.median(r["grpo_s"] for r in rs), 3)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "cpus": os.cpu_count(), "runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
