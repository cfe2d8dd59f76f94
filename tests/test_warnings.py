"""A training run prints no deprecation warning: every deprecated call is an error here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_run_makes_no_deprecated_call(tmp_path):
    """A warm-up step, GRPO steps (KV-cache decoding, the log-prob passes), a checkpoint and
    the held-out evaluation, with every DeprecationWarning and FutureWarning turned into an
    error: a deprecated call anywhere on the path fails the run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", str(REPO / "train.py"),
         "--config", str(REPO / "configs" / "tiny.yaml"), f"model.path={tmp_path / 'model'}",
         f"data.train_path={tmp_path / 'data' / 'train.jsonl'}", f"data.eval_path={tmp_path / 'data' / 'eval.jsonl'}",
         "data.synthetic_train_size=32", "data.synthetic_eval_size=8", "data.eval_every=0",
         "algorithm.format_warmup_steps=1", "run.steps=2", "distribution.activation_checkpointing=true",
         "logging.progress_bar=false", f"run.output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Warning" not in proc.stderr, proc.stderr[-4000:]
    assert (out / "history.jsonl").read_text().count("\n") == 3
