"""Training checkpoints: the full state with torch.distributed.checkpoint, written atomically.

Layout of a run directory::

    <run>/checkpoints/step_<N>/state/            model + optimizer (DCP, sharded across ranks)
    <run>/checkpoints/step_<N>/rank<r>.pt        RNG states and data position of rank r
    <run>/checkpoints/step_<N>/trainer_state.json  step, scheduler, counters (complete marker)
    <run>/checkpoints/step_<N>/hf/               transformers-format export for evaluate.py

A checkpoint is written under a temporary name and renamed when every rank has finished,
so a run killed mid-save never leaves a checkpoint that looks complete. Only the last
``keep_last`` full states are kept; the (much smaller) exports stay for evaluation sweeps.

``rank<r>.pt`` holds only tensors and plain values (RNG states converted), so it is read with
``torch.load(weights_only=True)``: a file that would run code when unpickled is refused.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from models.distributed import barrier

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from: incomplete, unsafe to load, or saved by
    another number of processes. The message names the checkpoint or the file."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers (what ``weights_only=True`` can load)."""
    version, internal, gauss = random.getstate()  # internal: 624 words of MT19937 + the index
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_state(rank_file: Path) -> dict:
    """One rank's RNG states and data position, loaded without running any pickled code."""
    try:
        return torch.load(rank_file, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ResumeError(f"{rank_file}: refused to load: it holds Python objects, not only tensors and plain "
                          f"values ({first}). This trainer never writes such a file; if it came from "
                          "elsewhere, do not load it") from None


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


def list_exports(run_dir: str | Path) -> list[Path]:
    """``<run>/checkpoints/step_<N>/hf`` export directories of a run, by step (what evaluate.py sweeps)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p / "hf") for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "hf").is_dir()]
    return [p for _, p in sorted(found)]


def step_of(path: str | Path) -> int:
    """N of the innermost ``step_<N>`` folder in ``path``; 0 when there is none (a base model)."""
    for part in reversed(Path(path).parts):
        match = STEP_DIR.match(part)
        if match:
            return int(match.group(1))
    return 0


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest``, the newest complete full state of the run
    (ResumeError when there is none: nothing to continue is not a fresh start unasked);
    ``auto``, the same or None (a job restarted with the same command starts fresh the
    first time); else a checkpoint path."""
    if resume in ("latest", "auto"):
        full = [p for _, p in list_checkpoints(run_dir) if (p / "state").is_dir()]
        if full or resume == "auto":
            return full[-1] if full else None
        raise ResumeError(f"--resume: {run_dir} holds no checkpoint to continue from. Start the run without "
                          "--resume, or pass --resume auto to continue when a checkpoint exists and start "
                          "fresh otherwise")
    path = Path(resume)
    if not (path / COMPLETE).is_file() or not (path / "state").is_dir():
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} or state/ in it)")
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
    frozen: bool = True,
) -> Path:
    """Write the full training state of ``step``; every rank calls this.

    Steps:
      1. rank 0 makes an empty temporary directory, all ranks wait for it;
      2. model and optimizer state (and ``extra_models``, e.g. a reference model that
         is no longer the initial checkpoint) through DCP, each rank its own shards;
      3. each rank writes its RNG states and data position;
      4. ``export_fn(dir)`` writes the transformers-format model (all ranks take part);
      5. rank 0 writes trainer_state.json, renames the directory, prunes old states.

    ``frozen=False`` leaves frozen parameters out of the model state (LoRA: the base
    weights are those of the model's own directory, only the adapters are saved).
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(frozen))
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    dcp.save(state, checkpoint_id=str(tmp / "state"))
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{rank}.pt")
    if export_fn is not None:
        export_fn(tmp / "hf")
    barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(run_dir, keep_last)
    barrier()
    return final


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete the full states of all but the newest ``keep_last`` checkpoints (exports stay)."""
    full = [p for _, p in list_checkpoints(run_dir) if (p / "state").is_dir()]
    for path in full[: max(len(full) - keep_last, 0)]:
        shutil.rmtree(path / "state", ignore_errors=True)
        for f in path.glob("rank*.pt"):
            f.unlink()


def _options(frozen: bool) -> StateDictOptions | None:
    # None keeps torch's defaults, so a run without LoRA saves and loads exactly as before.
    # Without the frozen weights, loading is not strict about them (they stay as loaded
    # from model.path); dcp.load still fails on any key the checkpoint lacks.
    return None if frozen else StateDictOptions(ignore_frozen_params=True, strict=False)


def load_checkpoint(path: str | Path, model, optimizer, *, rank: int, extra_models: dict | None = None,
                    frozen: bool = True) -> tuple[dict, dict]:
    """Load model, optimizer (and ``extra_models``) in place; return (trainer_state, this rank's state).

    The run must have as many ranks as the one that saved it: data positions and RNG
    states are per rank. ``frozen``: as given to ``save_checkpoint``.
    """
    path = Path(path)
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise ResumeError(f"{rank_file} is missing: resume with the same number of processes as the saved run")
    rank_state = load_rank_state(rank_file)  # first: an unsafe file is refused before anything changes
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(frozen))
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(frozen))
    for name, m in (extra_models or {}).items():
        set_model_state_dict(m, state[name])
    trainer_state = json.loads((path / COMPLETE).read_text())
    set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state
