"""Training checkpoints: the full state with torch.distributed.checkpoint, written atomically.

Layout of a run directory::

    <run>/checkpoints/step_<N>/state/            model + optimizer (DCP, sharded across ranks)
    <run>/checkpoints/step_<N>/rank<r>.pt        RNG states and data position of rank r
    <run>/checkpoints/step_<N>/trainer_state.json  step, scheduler, counters (complete marker)
    <run>/checkpoints/step_<N>/hf/               transformers-format export for evaluate.py

A checkpoint is written under a temporary name and renamed when every rank has finished,
so a run killed mid-save never leaves a checkpoint that looks complete. Only the last
``keep_last`` full states are kept; the (much smaller) exports stay for evaluation sweeps.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / COMPLETE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """``latest`` -> the newest complete full state of the run (None if there is none); else a path."""
    if resume == "latest":
        full = [p for _, p in list_checkpoints(run_dir) if (p / "state").is_dir()]
        return full[-1] if full else None
    path = Path(resume)
    if not (path / COMPLETE).is_file() or not (path / "state").is_dir():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} or state/ in it)")
    return path


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    rank_state: dict,
    *,
    rank: int,
    keep_last: int,
    export_fn=None,
    extra_models: dict | None = None,
) -> Path:
    """Write the full training state of ``step``; every rank calls this.

    Steps:
      1. rank 0 makes an empty temporary directory, all ranks wait for it;
      2. model and optimizer state (and ``extra_models``, e.g. a reference model that
         is no longer the initial checkpoint) through DCP, each rank its own shards;
      3. each rank writes its RNG states and data position;
      4. ``export_fn(dir)`` writes the transformers-format model (all ranks take part);
      5. rank 0 writes trainer_state.json, renames the directory, prunes old states.
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    dcp.save(state, checkpoint_id=str(tmp / "state"))
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{rank}.pt")
    if export_fn is not None:
        export_fn(tmp / "hf")
    _barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(run_dir, keep_last)
    _barrier()
    return final


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete the full states of all but the newest ``keep_last`` checkpoints (exports stay)."""
    full = [p for _, p in list_checkpoints(run_dir) if (p / "state").is_dir()]
    for path in full[: max(len(full) - keep_last, 0)]:
        shutil.rmtree(path / "state", ignore_errors=True)
        for f in path.glob("rank*.pt"):
            f.unlink()


def load_checkpoint(path: str | Path, model, optimizer, *, rank: int, extra_models: dict | None = None) -> tuple[dict, dict]:
    """Load model, optimizer (and ``extra_models``) in place; return (trainer_state, this rank's state).

    The run must have as many ranks as the one that saved it: data positions and RNG
    states are per rank.
    """
    path = Path(path)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} is missing: resume with the same number of processes as the saved run")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, m in (extra_models or {}).items():
        set_model_state_dict(m, state[name])
    trainer_state = json.loads((path / COMPLETE).read_text())
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state
