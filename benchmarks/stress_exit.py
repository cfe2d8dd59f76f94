"""Many short multi-process runs, each of which must exit 0: the shutdown path under stress.

    .venv/bin/python benchmarks/stress_exit.py                    # 30 train runs + 10 evaluate runs
    .venv/bin/python benchmarks/stress_exit.py --train-runs 60 --eval-runs 0 --nproc 2

Each run is a complete ``torchrun --nproc_per_node N`` launch of ``train.py`` (the tiny
model: a warm-up step, a GRPO step, a checkpoint at each, the final held-out evaluation) or of
``evaluate.py`` on the tiny model. A finished run that a rank ends with an abort at exit
(SIGABRT, "terminate called without an active exception") makes torchrun exit non-zero, and
the run counts as failed. The tiny model and data are built first (as ``make train`` builds
them). Prints one line per failed run (its log is kept under ``--work``) and a summary; exits
1 if any run failed. Every process gets one thread (``OMP_NUM_THREADS=1``), so that N ranks on
a small machine do not wait on each other's cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABORT_MARKS = ("terminate called", "Fatal Python error", "exitcode  : -6", "SIGABRT")


def build_demo_inputs(work: Path) -> tuple[Path, Path, Path]:
    """The tiny model and the synthetic train/held-out sets, as configs/tiny.yaml builds them."""
    sys.path.insert(0, str(REPO))
    from grpo.config import load_config
    from grpo.setup import prepare_data, prepare_model

    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.path={work / 'model'}", f"data.train_path={work / 'data' / 'train.jsonl'}",
        f"data.eval_path={work / 'data' / 'eval.jsonl'}", "data.synthetic_train_size=64", "data.synthetic_eval_size=16"])
    prepare_model(cfg)
    prepare_data(cfg)
    return work / "model", work / "data" / "train.jsonl", work / "data" / "eval.jsonl"


def train_command(nproc: int, model: Path, train: Path, held_out: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
            f"model.path={model}", "model.build_tiny=false", f"data.train_path={train}",
            f"data.eval_path={held_out}", "data.synthetic_generate=false", "data.eval_every=0",
            "data.eval_samples=16", "run.steps=1", "algorithm.format_warmup_steps=1",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "checkpointing.every=1",
            "logging.progress_bar=false", "logging.sample_every=0", f"run.output_dir={out}", "run.overwrite=true"]


def evaluate_command(nproc: int, model: Path, held_out: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(REPO / "evaluate.py"), "--config", str(REPO / "configs" / "eval_tiny.yaml"),
            "--checkpoint", str(model), f"data.path={held_out}", "data.synthetic_generate=false",
            "generation.max_new_tokens=4", f"output.dir={out}", f"output.log_dir={out / 'tb'}", "--force"]


def run_once(command: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """(exit status or None on a time-out, seconds); the whole output goes to ``log``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    with log.open("w") as f:
        # a new session, so that a hang can be killed with all of torchrun's children
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = None
    return status, time.perf_counter() - start


def stress(kind: str, runs: int, command: list[str], work: Path, timeout_s: float) -> list[str]:
    """Run ``command`` ``runs`` times; the descriptions of the failed runs."""
    failures = []
    for i in range(1, runs + 1):
        log = work / f"{kind}-{i}.log"
        status, seconds = run_once(command, log, timeout_s)
        text = log.read_text(errors="replace")
        aborted = [mark for mark in ABORT_MARKS if mark in text]
        if status != 0 or aborted:
            why = "timed out" if status is None else f"exit {status}"
            failures.append(f"{kind} run {i}: {why}{', ' + aborted[0] if aborted else ''} (log: {log})")
            print(failures[-1], flush=True)
        else:
            log.unlink()
        print(f"{kind} {i}/{runs}: {'ok' if status == 0 and not aborted else 'FAILED'} in {seconds:.1f} s",
              flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-runs", type=int, default=30)
    parser.add_argument("--eval-runs", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one launch may take")
    parser.add_argument("--work", type=Path, default=None, help="where the model, data, runs and logs go")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="stress-exit-"))
    work.mkdir(parents=True, exist_ok=True)
    model, train, held_out = build_demo_inputs(work)
    failures = stress("train", args.train_runs, train_command(args.nproc, model, train, held_out, work / "run"),
                      work, args.timeout)
    failures += stress("evaluate", args.eval_runs, evaluate_command(args.nproc, model, held_out, work / "eval"),
                       work, args.timeout)
    total = args.train_runs + args.eval_runs
    print(f"stress_exit: {total - len(failures)} of {total} launches of {args.nproc} processes exited 0 "
          f"({args.train_runs} train.py, {args.eval_runs} evaluate.py)")
    if not failures and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
