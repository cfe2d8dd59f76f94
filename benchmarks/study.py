"""Does GRPO beat SFT on the audio question suite (data/suite.py), in distribution and shifted?

One command, from one format-warmed model:

  1. build a tiny Qwen2-Audio whose tokenizer knows the suite's words, and the questions:
     a warm-up pool, the training pool (its first N questions are the set of size N), the
     in-distribution held-out split (``test``) and the shifted one (``shifted``), both in one
     held-out file whose tasks read ``id/<skill>`` and ``shift/<skill>``;
  2. the label-free format warm-up once (the trainer's own: every choice equally, so accuracy
     stays at chance), exported; every later run starts from that export;
  3. per N and seed: SFT (the correct choice as the target) and GRPO on the same N questions,
     for the same number of optimizer steps and prompts per step;
  4. at one N: the GRPO family (grpo, dr_grpo, dapo, gspo, cispo, gmpo, sapo), each with
     mu = 2 so the off-policy losses act;
  5. a markdown table, the JSON of every run and a PNG (accuracy against N, SFT and GRPO,
     both splits) under benchmarks/results/.

Every run is a ``train.py`` process (the trainer's public entry: configs/tiny.yaml plus
overrides), several at a time with one thread each, at the lowest CPU priority.

    .venv/bin/python benchmarks/study.py            # the full study (about an hour on 2 idle cores)
    .venv/bin/python benchmarks/study.py --quick    # fewer seeds and steps (about 15 minutes)
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
sys.path.insert(0, str(REPO))

from benchmarks.png import line_panels  # noqa: E402
from data.suite import NUM_CHOICES, SKILLS, suite_corpus, write_suite  # noqa: E402

# The GRPO family: keys on top of the study's GRPO recipe (configs/tiny.yaml's, mu = 2 for all).
# Clip ranges are each paper's: DAPO clip-higher 0.28, GSPO's sequence range (3e-4, 4e-4),
# GMPO's (e^-0.4, e^0.4), CISPO's no lower bound and 1.28 above (as configs/cispo_avqa.yaml).
VARIANTS = {
    "grpo": [],
    "dr_grpo": ["algorithm.loss_type=dr_grpo", "algorithm.advantage_scale=none"],
    "dapo": ["algorithm.loss_type=token_mean", "algorithm.eps_high=0.28", "algorithm.beta=0.0"],
    "gspo": ["algorithm.importance_level=sequence", "algorithm.eps_low=0.0003", "algorithm.eps_high=0.0004"],
    "cispo": ["algorithm.policy_loss_type=cispo", "algorithm.loss_type=token_mean", "algorithm.eps_low=0.99",
              "algorithm.eps_high=0.28"],
    "gmpo": ["algorithm.policy_loss_type=gmpo", "algorithm.eps_low=0.4", "algorithm.eps_high=0.4"],
    "sapo": ["algorithm.policy_loss_type=sapo"],
}

PRESETS = {  # sizes, seeds, steps; quick: what fits about 15 minutes on two idle cores
    "full": dict(sizes=[64, 256, 1024], seeds=[0, 1, 2, 3, 4], steps=200, eval_per_skill=12,
                 variant_n=256, variant_seeds=[0, 1, 2], warmup_steps=150),
    "quick": dict(sizes=[64, 256, 1024], seeds=[0, 1], steps=40, eval_per_skill=6,
                  variant_n=256, variant_seeds=[0], warmup_steps=150),
}


def build_inputs(root: Path, p: dict, model_seed: int = 0) -> dict:
    """The tiny model and every question file (built once; reused when present)."""
    from models.tiny import build_tiny_checkpoint

    data, model = root / "data", root / "model"
    if not (model / "config.json").is_file():
        build_tiny_checkpoint(model, seed=model_seed, corpus=suite_corpus(), audio_seconds=3.0)
    n_max = max(p["sizes"])
    train_file = data / "train.jsonl"
    if not train_file.is_file() or len(train_file.read_text().splitlines()) < n_max:  # a pool too small: rebuild
        write_suite(data, n=n_max, seed=0, split="train")
    lines = train_file.read_text().splitlines()
    for n in p["sizes"]:  # the first n questions of the pool are the set of size n
        (data / f"train-{n}.jsonl").write_text("\n".join(lines[:n]) + "\n")
        assert len(set(lines[:n])) == n, f"{train_file} holds fewer than {n} questions"
    if not (data / "warmup" / "train.jsonl").is_file():  # another RNG stream: no training question
        write_suite(data / "warmup", n=256, seed=100, split="train")
    e = p["eval_per_skill"] * len(SKILLS)
    held = []
    for split, prefix in (("test", "id"), ("shifted", "shift")):
        path = data / f"{split}.jsonl"
        if not path.is_file() or len(path.read_text().splitlines()) != e:
            write_suite(data, n=e, seed=0, split=split)
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            held.append(json.dumps({**rec, "task": f"{prefix}/{rec['task']}"}))
    (data / "heldout.jsonl").write_text("\n".join(held) + "\n")
    return {"model": model, "data": data, "heldout": data / "heldout.jsonl"}


def base_overrides(model: Path, heldout: Path, steps: int) -> list[str]:
    return [f"model.path={model}", "model.build_tiny=false", "data.synthetic_generate=false",
            f"data.eval_path={heldout}", "data.eval_every=0", "data.eval_samples=0",
            "algorithm.format_warmup_steps=0", f"run.steps={steps}", "logging.progress_bar=false",
            "logging.tensorboard=false", "logging.sample_every=0", "checkpointing.export=false",
            "checkpointing.every=0", "run.overwrite=true", "rollout.max_new_tokens=12",
            # one rollout round a step: GRPO's cost per step is then fixed (16 x 4 completions)
            "algorithm.dynamic_sampling=false"]


def train(out: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """One train.py run at the lowest CPU priority, one thread; (its history, wall seconds)."""
    cmd = ["nice", "-n", "19", sys.executable, str(REPO / "train.py"), "--config", "configs/tiny.yaml",
           f"run.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{out} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()], seconds


def warm_up(root: Path, inputs: dict, steps: int) -> Path:
    """The trainer's label-free format warm-up on the warm-up pool, once; the export after it."""
    export = root / "warm" / "checkpoints" / f"step_{steps}" / "hf"
    if (export / "config.json").is_file():
        return export
    overrides = [f"model.path={inputs['model']}", "model.build_tiny=false", "data.synthetic_generate=false",
                 f"data.train_path={inputs['data'] / 'warmup' / 'train.jsonl'}", f"data.eval_path={inputs['heldout']}",
                 f"algorithm.format_warmup_steps={steps}", "run.steps=1", "data.eval_every=0", f"checkpointing.every={steps}",
                 "checkpointing.export=true", "checkpointing.keep_last=2", "logging.progress_bar=false",
                 "logging.tensorboard=false", "logging.sample_every=0", "run.overwrite=true", "run.seed=0"]
    history, seconds = train(root / "warm", overrides)
    warm = [r for r in history if r["step"] == steps][0]
    after = split_scores(history[-1])
    print(f"warm-up: {steps} steps in {seconds:.0f} s, loss {warm['train/loss']:.3f}; held-out after it "
          f"(and one GRPO step): id {after['id']:.2f}, shifted {after['shift']:.2f}", flush=True)
    (root / "warm" / "after.json").write_text(json.dumps({"loss": warm["train/loss"], "scores": after}))
    return export


def split_scores(row: dict) -> dict:
    """{'id': overall, 'shift': overall, 'id/<skill>': ..., 'shift/<skill>': ...} from an eval row
    (overall: the mean over skills, the splits being balanced)."""
    out = {}
    for prefix in ("id", "shift"):
        per = {s: row[f"eval/greedy_accuracy/{prefix}/{s}"] for s in SKILLS}
        out[prefix] = statistics.mean(per.values())
        out.update({f"{prefix}/{s}": v for s, v in per.items()})
    return out


def finished_history(out: Path, steps: int) -> list[dict] | None:
    """The history of a run in ``out`` that reached ``steps`` and its final evaluation, or None."""
    path = out / "history.jsonl"
    if not path.is_file():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines()]
    done = history and history[-1]["step"] == steps and "eval/greedy_accuracy" in history[-1]
    return history if done else None


def run_job(job: dict, root: Path, warm: Path, inputs: dict, steps: int, reuse: str = "no") -> dict | None:
    """Train one run (or, with ``reuse``, read one that finished: "yes" trains the rest, "only"
    skips them) and score it."""
    prefix = "" if job["group"] == "main" else f"{job['group']}-"  # the family's grpo (mu = 2) is another run
    out = root / "runs" / f"{prefix}{job['name']}-n{job['n']}-seed{job['seed']}"
    overrides = [*base_overrides(warm, inputs["heldout"], steps),
                 f"data.train_path={inputs['data'] / ('train-%d.jsonl' % job['n'])}", f"run.seed={job['seed']}",
                 *job["overrides"]]
    history = finished_history(out, steps) if reuse != "no" else None
    if history is not None:
        wall = out / "wall.json"  # else: from the run directory's first and last writes (start-up left out)
        seconds = (json.loads(wall.read_text())["wall_s"] if wall.is_file()
                   else (out / "history.jsonl").stat().st_mtime - (out / "config.yaml").stat().st_mtime)
    elif reuse == "only":
        return None
    else:
        history, seconds = train(out, overrides)
        (out / "wall.json").write_text(json.dumps({"wall_s": seconds}))
    last = [r for r in history if "eval/greedy_accuracy" in r][-1]
    scores = split_scores(last)
    step_seconds = sum(r.get("timing/step", 0.0) for r in history)
    rounds = [r["rollout/sampling_rounds"] for r in history if "rollout/sampling_rounds" in r]
    print(f"{job['name']} N={job['n']} seed {job['seed']}: id {scores['id']:.2f} shift {scores['shift']:.2f} "
          f"({seconds:.0f} s)", flush=True)
    return {**job, "scores": scores, "wall_s": seconds, "step_s": step_seconds, "steps": last["step"],
            "sampling_rounds": sum(rounds) if rounds else None}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def chance_level() -> float:
    return statistics.mean(1 / NUM_CHOICES[s] for s in SKILLS)


def tables(results: list[dict], p: dict) -> str:
    lines = []
    main = [r for r in results if r["group"] == "main"]
    lines += ["## SFT against GRPO", "",
              "Held-out greedy accuracy, mean (min-max) over seeds; overall = the mean over the nine skills "
              f"(chance {chance_level():.2f}).", "",
              "| N | method | seeds | in-distribution | shifted | step time, s (sum) | wall, s (mean) |",
              "|---|---|---|---|---|---|---|"]
    for n in p["sizes"]:
        for name in ("sft", "grpo"):
            rs = [r for r in main if r["n"] == n and r["name"] == name]
            if rs:
                lines.append(f"| {n} | {name} | {len(rs)} | {spread([r['scores']['id'] for r in rs])} | "
                             f"{spread([r['scores']['shift'] for r in rs])} | "
                             f"{statistics.mean(r['step_s'] for r in rs):.0f} | "
                             f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    lines += ["", "GRPO minus SFT, per seed (the same seed's runs), mean (min-max):", "",
              "| N | in-distribution | shifted |", "|---|---|---|"]
    for n in p["sizes"]:
        pairs = [(g, s) for g in main for s in main if g["name"] == "grpo" and s["name"] == "sft"
                 and g["n"] == s["n"] == n and g["seed"] == s["seed"]]
        if pairs:
            lines.append(f"| {n} | {spread([g['scores']['id'] - s['scores']['id'] for g, s in pairs])} | "
                         f"{spread([g['scores']['shift'] - s['scores']['shift'] for g, s in pairs])} |")
    for split, label in (("id", "in-distribution"), ("shift", "shifted")):
        lines += ["", f"Per skill, {label} (mean over seeds):", "",
                  "| N | method | " + " | ".join(SKILLS) + " |", "|---|---|" + "---|" * len(SKILLS)]
        for n in p["sizes"]:
            for name in ("sft", "grpo"):
                rs = [r for r in main if r["n"] == n and r["name"] == name]
                if rs:
                    lines.append(f"| {n} | {name} | " + " | ".join(
                        f"{statistics.mean(r['scores'][f'{split}/{s}'] for r in rs):.2f}" for s in SKILLS) + " |")
    fam = [r for r in results if r["group"] == "family"]
    if fam:
        lines += ["", f"## The GRPO family at N = {p['variant_n']} (mu = 2 for every loss)", "",
                  "| loss | keys | seeds | in-distribution | shifted | step time, s (sum) |", "|---|---|---|---|---|---|"]
        for name, keys in VARIANTS.items():
            rs = [r for r in fam if r["name"] == name]
            if rs:
                shown = " ".join(k.removeprefix("algorithm.") for k in keys) or "(the recipe)"
                lines.append(f"| {name} | `{shown}` | {len(rs)} | {spread([r['scores']['id'] for r in rs])} | "
                             f"{spread([r['scores']['shift'] for r in rs])} | "
                             f"{statistics.mean(r['step_s'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], p: dict, path: Path) -> None:
    main = [r for r in results if r["group"] == "main"]
    colors = {"sft": (40, 90, 200), "grpo": (210, 50, 40)}
    panels = []
    for split, title in (("id", "IN-DIST"), ("shift", "SHIFTED")):
        series = {}
        for name in ("sft", "grpo"):
            pts = []
            for n in p["sizes"]:
                v = [r["scores"][split] for r in main if r["n"] == n and r["name"] == name]
                if v:
                    pts.append((n, statistics.mean(v), min(v), max(v)))
            series[name] = (colors[name], pts)
        panels.append((title, series))
    line_panels(panels, path, chance=chance_level())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer seeds and steps (about 15 minutes)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--root", default="runs/study", help="model, data and run directories go here")
    ap.add_argument("--out", default="benchmarks/results", help="the table, JSON and PNG go here")
    ap.add_argument("--no-family", action="store_true", help="leave out the GRPO family sweep")
    ap.add_argument("--sizes", default=None, help="override the preset's N, e.g. 64,256")
    ap.add_argument("--seeds", default=None, help="override the preset's seeds, e.g. 0,1,2")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    ap.add_argument("--reuse", choices=("no", "yes", "only"), default="no",
                    help="yes: read the runs that already finished in --root, train the rest; only: report "
                         "the finished runs, train nothing")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    preset = "quick" if args.quick else "full"
    p = dict(PRESETS[preset])
    if args.sizes:
        p["sizes"] = [int(x) for x in args.sizes.split(",")]
    if args.seeds:
        p["seeds"] = [int(x) for x in args.seeds.split(",")]
    if args.steps:
        p["steps"] = args.steps
    root = Path(args.root) / preset
    t0 = time.perf_counter()
    inputs = build_inputs(root, p)
    warm = warm_up(root, inputs, p["warmup_steps"])
    jobs = [dict(group="main", name=name, n=n, seed=seed, overrides=["algorithm.name=sft"] if name == "sft" else [])
            for seed in p["seeds"] for n in p["sizes"] for name in ("sft", "grpo")]
    if not args.no_family:
        jobs += [dict(group="family", name=name, n=p["variant_n"], seed=seed, overrides=["algorithm.mu=2", *keys])
                 for seed in p["variant_seeds"] for name, keys in VARIANTS.items()]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [r for r in pool.map(lambda j: run_job(j, root, warm, inputs, p["steps"], args.reuse), jobs) if r]
    wall = time.perf_counter() - t0
    header = (f"# The audio question suite: SFT against GRPO ({preset})\n\n"
              f"`python benchmarks/study.py{' --quick' if args.quick else ''}`: sizes {p['sizes']}, seeds {p['seeds']}, "
              f"{p['steps']} optimizer steps per run (16 questions a step; GRPO 4 completions each), "
              f"{p['warmup_steps']} warm-up steps once; held-out {p['eval_per_skill']} questions per skill per split; "
              f"{len(results)} of {len(jobs)} runs, {args.jobs} at a time at nice 19 with one thread each, on "
              f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), {date.today()}, "
              f"{wall:.0f} s in this invocation.\n\n![accuracy against N](study-{preset}.png)\n\n"
              "The plot: held-out greedy accuracy against N (log scale), in-distribution left, shifted right; "
              "SFT blue, GRPO red; dots the mean over seeds, bars min-max; dashed: chance.\n\n")
    after = json.loads((root / "warm" / "after.json").read_text())
    header += (f"The warmed model (after its warm-up and one GRPO step, as the warm-up run ends): "
               f"in-distribution {after['scores']['id']:.2f}, shifted {after['scores']['shift']:.2f}; "
               f"warm-up loss {after['loss']:.3f}.\n\n")
    text = header + tables(results, p)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"study-{preset}.md").write_text(text)
    (out / f"study-{preset}.json").write_text(json.dumps({"preset": p, "warm": after, "runs": results}, indent=1))
    plot(results, p, out / f"study-{preset}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
