"""`make train` as a newcomer uses it: the Makefile's own command line, stopped with Ctrl-C
and run again, continues the stopped run; run again once finished, it moves the finished run
aside and starts afresh. Only the config differs from the demo's: the same recipe, cut short."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def make_train_command() -> str:
    """The shell line of the Makefile's ``train`` recipe, with make's own syntax resolved."""
    lines = (REPO / "Makefile").read_text().splitlines()
    recipe = lines[lines.index("train: $(STAMP)") + 1]
    assert recipe.startswith("\t"), recipe
    return recipe.strip().replace("$(PY)", sys.executable).replace("$$", "$")


def short_demo_config(tmp: Path) -> Path:
    """configs/tiny.yaml, its paths in ``tmp`` and its phases a few steps long."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["run"].update(output_dir=str(tmp / "runs" / "tiny"), steps=4)
    cfg["model"]["path"] = str(tmp / "model")
    cfg["data"].update(train_path=str(tmp / "data" / "train.jsonl"), eval_path=str(tmp / "data" / "eval.jsonl"),
                       synthetic_train_size=64, synthetic_eval_size=8, eval_every=0)
    cfg["rollout"].update(prompts_per_step=4, generation_batch_prompts=4, max_new_tokens=8)
    cfg["algorithm"].update(format_warmup_steps=1, micro_batch_prompts=4)
    cfg["logging"].update(progress_bar=False, sample_every=0, tensorboard=False)
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def history_steps(run: Path) -> list[int]:
    path = run / "history.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_make_train_continues_a_stopped_run_and_restarts_a_finished_one(tmp_path):
    command = make_train_command()
    assert "train.py --config configs/tiny.yaml" in command
    command = command.replace("configs/tiny.yaml", str(short_demo_config(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    run = tmp_path / "runs" / "tiny"

    def make_train(stop_after_first_step: bool = False) -> tuple[int, str]:
        log = tmp_path / "make_train.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["bash", "-c", command], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            if stop_after_first_step:  # Ctrl-C once a step is logged
                deadline = time.time() + 300
                while not history_steps(run) and proc.poll() is None and time.time() < deadline:
                    time.sleep(0.02)
                proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=600)
        return code, log.read_text(errors="replace")

    code, out = make_train(stop_after_first_step=True)
    assert code == 128 + signal.SIGINT, out[-3000:]
    stopped_at = history_steps(run)[-1]
    assert stopped_at < 5 and f"stopped at step {stopped_at} of 5" in out, out[-3000:]

    code, out = make_train()  # continues: no step is trained twice, none is missing
    assert code == 0, out[-3000:]
    assert f"resumed from {run}/checkpoints/step_{stopped_at} at step {stopped_at}" in out, out[-3000:]
    assert history_steps(run) == list(range(1, 6))
    assert not list(run.parent.glob("tiny.replaced-*")), "a stopped run was moved aside instead of continued"
    assert "done at step 5" in out

    # the plain --resume on the finished run trains nothing and says so
    plain = subprocess.run([sys.executable, "train.py", "--config", str(tmp_path / "tiny.yaml"), "--resume"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert re.search(r"step_5: the run is finished \(step 5 of 5\): nothing to train", plain.stdout), plain.stdout

    code, out = make_train()  # finished: moved aside, and a fresh run from step 1
    assert code == 0, out[-3000:]
    aside = list(run.parent.glob("tiny.replaced-*"))
    assert len(aside) == 1 and history_steps(aside[0]) == list(range(1, 6))
    assert history_steps(run) == list(range(1, 6)) and "resumed from" not in out
    assert "the run is finished (step 5 of 5): run.overwrite=true moves it aside" in out
