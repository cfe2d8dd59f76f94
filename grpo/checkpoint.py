"""Training checkpoints: the full state with torch.distributed.checkpoint, written atomically.

Layout of a run directory::

    <run>/checkpoints/step_<N>/state/            model + optimizer (DCP, sharded across ranks)
    <run>/checkpoints/step_<N>/rank<r>.pt        RNG states and data position of rank r
    <run>/checkpoints/step_<N>/trainer_state.json  step, scheduler, counters (complete marker)
    <run>/checkpoints/step_<N>/manifest.json     every file's size and checksums (grpo.manifest)
    <run>/checkpoints/step_<N>/hf/               transformers-format export for evaluate.py

A checkpoint is written under a temporary name and renamed when every rank has finished,
so a run killed mid-save never leaves a checkpoint that looks complete. Only the last
``keep_last`` full states are kept; the (much smaller) exports stay for evaluation sweeps, or
only the newest ``keep_exports`` of them (and those of the kept full states: see _prune_exports).

A failed save (no space, no permission, over quota) removes its temporary directory and
raises SaveError on every rank, naming the path, the error and the newest complete checkpoint;
the earlier checkpoints are never touched by a save.

Before anything is loaded, the checkpoint is checked against its manifest (``verify_checkpoint``):
a missing, truncated or altered file is a ResumeError naming it and the newest checkpoint of the
run that verifies. Nothing read from a checkpoint can run code:

* ``rank<r>.pt`` holds only tensors and plain values (RNG states converted): it is read with
  ``torch.load(weights_only=True)``;
* DCP's ``state/.metadata`` is a pickle that torch reads with ``pickle.load``; it is read here
  by an unpickler that admits only the classes DCP's metadata is made of (``read_dcp_metadata``);
* DCP's non-tensor values (the optimizer's hyperparameters) are ``torch.save`` blobs that
  torch's default planner loads with ``weights_only=False``; they are read with
  ``weights_only=True`` first, before any tensor is copied into the model;
* the tensors themselves torch already reads with ``weights_only=True``.
"""

from __future__ import annotations

import errno as errno_names
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from grpo import manifest
from data.quote import cut, quote
from models.collectives import gather_objects
from models.distributed import barrier, export_checkpoint, full_state_dict
from models.lora import merged_state_dict, save_adapters

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from: incomplete, damaged, unsafe to load, or saved by
    another number of processes. The message names the checkpoint or the file."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message names the path, the error and the newest
    complete checkpoint. Raised on every rank; the temporary directory is gone."""


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
        state = torch.load(rank_file, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ResumeError(f"{rank_file}: refused to load: it holds Python objects, not only tensors and plain "
                          f"values ({first}). This trainer never writes such a file; if it came from "
                          "elsewhere, do not load it") from None
    except Exception as err:  # a truncated or garbled zip: torch's own message is a stack of C++ frames
        raise ResumeError(f"{rank_file} cannot be read as a rank state ({_first_line(err)})") from None
    if not isinstance(state, dict) or "rng" not in state:
        raise ResumeError(f"{rank_file} is not a rank state (no 'rng' entry)")
    now = rng_state()
    try:  # set and put back: a malformed RNG state is refused here, not after the weights are loaded
        set_rng_state(state["rng"])
    except Exception as err:
        raise ResumeError(f"{rank_file} does not hold RNG states this trainer wrote ({_first_line(err)})") from None
    finally:
        set_rng_state(now)
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- DCP, read without running code

# What DCP's .metadata pickle is made of (torch 2.11): its dataclasses, torch.Size, dtypes and
# layouts, and the checkpoint path the writer records. Nothing else may be named in the pickle,
# so no callable that runs code (os.system, builtins.eval, ...) can be reached from it.
_DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name, e.g. "torch.strided"
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),  # Python 3.13's module name
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP's metadata never holds")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """DCP's ``.metadata`` file, unpickled by a restricted unpickler and checked to be metadata:
    a file that would run code, or anything else that is not DCP metadata, is a ResumeError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except OSError as err:
        raise ResumeError(f"{path} cannot be read ({err.strerror or err})") from None
    except pickle.UnpicklingError as err:
        raise ResumeError(f"{path}: refused to load: not DCP checkpoint metadata ({err}). This trainer never "
                          "writes such a file; if it came from elsewhere, do not load it") from None
    except Exception as err:  # truncated or garbled: EOFError, ValueError, TypeError, RecursionError, ...
        raise ResumeError(f"{path} cannot be read as DCP checkpoint metadata ({_first_line(err)})") from None
    problem = _metadata_problem(metadata)
    if problem:
        raise ResumeError(f"{path} is not DCP checkpoint metadata: {problem}")
    return metadata


def _metadata_problem(md) -> str | None:
    if not isinstance(md, Metadata):
        return f"it holds a {type(md).__name__}"
    entries, storage = getattr(md, "state_dict_metadata", None), getattr(md, "storage_data", None)
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
            for k, v in entries.items()):
        return "its state_dict_metadata is not a table of tensors and values"
    if not isinstance(storage, dict):
        return "it has no storage table"
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "its storage table holds something else than file positions"
        rel, offset, length = (getattr(info, a, None) for a in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            return f"{quote(key.fqn)} is stored in {quote(rel)}, not a file of this folder"
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            return f"{quote(key.fqn)} has no valid position in {cut(rel)}"
        if getattr(info, "transform_descriptors", None):
            return (f"{quote(key.fqn)} is stored through transforms {quote(info.transform_descriptors)}, which this trainer "
                    "never uses")
    return None


def _safe_value(blob: io.BytesIO, where: str):
    """A non-tensor value DCP stored with torch.save, read with ``weights_only=True``."""
    try:
        return torch.load(blob, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ResumeError(f"{where}: refused to load: it holds Python objects, not only plain values ({first})") \
            from None
    except Exception as err:
        raise ResumeError(f"{where} cannot be read ({_first_line(err)})") from None


class _SafeReader(FileSystemReader):
    """DCP's file reader with ``read_metadata`` through the restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that non-tensor values are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = _safe_value(value, f"DCP value {read_item.dest_index.fqn}")
        again = io.BytesIO()  # re-serialised from plain values only, so the parent's unrestricted load is harmless
        torch.save(plain, again)
        again.seek(0)
        super().load_bytes(read_item, again)


def check_dcp_values(state_dir: str | Path) -> None:
    """Read every non-tensor value of a DCP checkpoint with ``weights_only=True`` (they are small:
    the optimizer's hyperparameters), so that an unsafe one is refused before any tensor is
    copied into a model."""
    state_dir = Path(state_dir)
    metadata = read_dcp_metadata(state_dir / ".metadata")
    for key, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue
        path = state_dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
        except OSError as err:
            raise ResumeError(f"{path} cannot be read ({err.strerror or err})") from None
        if len(blob) != info.length:
            raise ResumeError(f"{path} is truncated: {key.fqn} ends past its end")
        _safe_value(io.BytesIO(blob), f"{path} ({key.fqn})")


# --------------------------------------------------------------------------- finding checkpoints


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


def full_states(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints that still hold the full training state (not pruned), oldest first."""
    return [p for _, p in list_checkpoints(run_dir) if (p / "state").is_dir()]


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


# What a resume reads; the export (hf/, adapter/) is for evaluate.py and checked there.
RESUME_SKIPS = ("hf", "adapter")


def checkpoint_problem(path: str | Path) -> str | None:
    """None when the full state at ``path`` verifies against its manifest (sizes and checksums
    of state/, rank<r>.pt, trainer_state.json); else one line naming the file that does not.
    A collective when several ranks run."""
    path = Path(path)
    try:
        return manifest.verify(path, skip=RESUME_SKIPS, require=("state", COMPLETE))
    except manifest.ManifestError as err:
        return str(err)


def newest_verified(run_dir: str | Path, *, before: int | None = None) -> Path | None:
    """The newest full state of the run (older than step ``before``, when given) that verifies."""
    for path in reversed(full_states(run_dir)):
        if before is not None and step_of(path) >= before:
            continue
        if checkpoint_problem(path) is None:
            return path
    return None


def verify_checkpoint(path: str | Path, run_dir: str | Path | None = None) -> None:
    """ResumeError, naming the first bad file and the newest checkpoint of the run that verifies,
    unless the full state at ``path`` is complete and matches its manifest."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is None:
        return
    run_dir = Path(run_dir) if run_dir is not None else path.parent.parent
    good = newest_verified(run_dir, before=step_of(path))
    hint = (f"the newest checkpoint that verifies is {good}: resume from it with --resume {good}" if good
            else f"no older checkpoint of {run_dir} verifies")
    raise ResumeError(f"{problem}; {hint}")


def _incomplete_newer(run_dir: Path, step: int) -> list[Path]:
    """Checkpoint folders newer than ``step`` that are not complete full states (a save that
    never finished, a pruned state): what ``--resume`` passes over, so it is named."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    tmp = re.compile(r"^\.tmp_step_(\d+)$")
    newer = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name) or tmp.match(p.name)
        if m and int(m.group(1)) > step and not ((p / COMPLETE).is_file() and (p / "state").is_dir()):
            newer.append((int(m.group(1)), p))
    return [p for _, p in sorted(newer)]


def resolve_resume(run_dir: str | Path, resume: str, *, verify: bool = True) -> Path | None:
    """The checkpoint ``--resume`` names: ``latest``, the newest complete full state of the run
    (ResumeError when there is none: nothing to continue is not a fresh start unasked);
    ``auto``, the same or None (a job restarted with the same command starts fresh the
    first time); else a checkpoint path.

    With ``verify`` the checkpoint is checked against its manifest first (a ResumeError names
    the first bad file and the newest checkpoint that verifies): an older one is never picked
    silently. Folders newer than the one chosen that are not complete are named in a warning.
    ``verify=False`` only finds the checkpoint (the check before the process group exists,
    which would otherwise hash the whole state on every rank alone).
    """
    run_dir = Path(run_dir)
    if resume in ("latest", "auto"):
        full = full_states(run_dir)
        if not full:
            if resume == "auto":
                return None
            raise ResumeError(f"--resume: {run_dir} holds no checkpoint to continue from. Start the run without "
                              "--resume, or pass --resume auto to continue when a checkpoint exists and start "
                              "fresh otherwise")
        if not verify:
            return full[-1]
        newer = _incomplete_newer(run_dir, step_of(full[-1]))
        if newer:
            log.warning("--resume: passing over %s (not a complete checkpoint: the save did not finish, or its "
                        "full state was pruned)", ", ".join(str(p) for p in newer))
        verify_checkpoint(full[-1], run_dir)
        log.info("--resume: %s (step %d) is the newest complete checkpoint, and it verifies", full[-1],
                 step_of(full[-1]))
        return full[-1]
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"--resume {resume}: not found (give a checkpoint folder, e.g. {run_dir}/checkpoints/"
                          "step_<N>, or --resume alone for the run's latest)")
    if not (path / COMPLETE).is_file() or not (path / "state").is_dir():
        raise ResumeError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} or state/ in it)")
    if verify:
        verify_checkpoint(path)
    return path


# --------------------------------------------------------------------------- saving


def _describe(err: BaseException) -> tuple[str, int | None]:
    """(what went wrong in words, errno or None) for an exception, looking inside DCP's wrapper."""
    if isinstance(err, CheckpointException):
        inner = [exc for exc, _ in err.failures.values()]
        with_errno = [e for e in inner if isinstance(e, OSError) and e.errno]
        return _describe((with_errno or inner or [RuntimeError("DCP failed")])[0])
    if isinstance(err, OSError) and err.errno:
        words = {errno_names.ENOSPC: "no space left on device", errno_names.EACCES: "permission denied",
                 errno_names.EPERM: "operation not permitted", errno_names.EDQUOT: "disk quota exceeded",
                 errno_names.EROFS: "read-only file system"}.get(err.errno, err.strerror or os.strerror(err.errno))
        where = f" ({err.filename})" if err.filename else ""
        return f"{words}{where} [errno {errno_names.errorcode.get(err.errno, err.errno)}]", err.errno
    return _first_line(err), None


def _agree(failure: tuple[str, int | None] | None) -> tuple[str, int | None] | None:
    """Every rank's failure of a save phase, agreed on: the first with an errno (the cause, not
    a rank told of it), else the first; None when every rank succeeded. A collective."""
    failed = [f for f in gather_objects(failure) if f is not None]
    return (sorted(failed, key=lambda f: f[1] is None)[0]) if failed else None


def newest_complete(run_dir: str | Path) -> str:
    """The newest complete full state of a run, in words (for messages)."""
    full = [p for p in full_states(run_dir) if (p / manifest.MANIFEST).is_file()]
    return f"{full[-1]} (step {step_of(full[-1])})" if full else "none (no complete checkpoint yet)"


def checkpoint_exports(model, processor, generation_config, lora, *, export: bool, is_main: bool, dtype=None):
    """What ``save_training_state`` writes besides the training state (its ``export_fn``), or
    None for nothing: with ``export``, a plain transformers checkpoint in ``hf/`` (with LoRA,
    the adapters merged into it) with its floating weights in ``dtype`` (None: as stored, fp32
    under FSDP); with LoRA (``lora``: the config's lora section), the adapters alone in the
    step's ``adapter/`` (written by rank 0; every rank takes part in the gathers)."""
    if not (export or lora.enabled):
        return None

    def export_fn(out_dir):
        if export:
            merge = (lambda state: merged_state_dict(state, lora.alpha / lora.rank)) if lora.enabled else None
            export_checkpoint(model, processor, generation_config, out_dir, transform=merge, dtype=dtype)
        if lora.enabled:
            adapters = full_state_dict(model, trainable_only=True)
            if is_main:
                save_adapters(adapters, Path(out_dir).parent / "adapter", rank=lora.rank, alpha=lora.alpha,
                              dropout=lora.dropout, targets=lora.targets)

    return export_fn


def save_training_state(
    run_dir: str | Path,
    step: int,
    model,
    optimizer,
    trainer_state: dict,
    rank_state: dict,
    *,
    rank: int,
    keep_last: int,
    keep_exports: int = 0,
    export_fn=None,
    extra_models: dict | None = None,
    with_frozen: bool = True,
) -> Path:
    """Write the full training state of ``step``; every rank calls this.

    Steps:
      1. rank 0 makes an empty temporary directory, all ranks wait for it;
      2. model and optimizer state (and ``extra_models``, e.g. a reference model that
         is no longer the initial checkpoint) through DCP, each rank its own shards;
      3. each rank writes its RNG states and data position;
      4. ``export_fn(dir)`` writes the transformers-format model (all ranks take part);
      5. rank 0 writes trainer_state.json, all ranks hash their share of the files, rank 0
         writes manifest.json and renames the directory, then prunes old states (and old
         exports beyond ``keep_exports``; 0 keeps every export).

    After each step the ranks agree on whether it failed: a failure on any rank (a full disk,
    no permission, a quota) removes the temporary directory and raises SaveError on every
    rank, naming the path, the error and the newest complete checkpoint.

    ``with_frozen=False`` leaves frozen parameters out of the model state (LoRA: the base
    weights are those of the model's own directory, only the adapters are saved).
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"

    def phase(body) -> None:
        _save_phase(body, rank=rank, tmp=tmp, final=final, step=step, run_dir=run_dir)

    def write_complete():
        if rank == 0:
            (tmp / COMPLETE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))

    phase(lambda: _make_empty_dir(tmp, rank))
    phase(lambda: _write_state(tmp, model, optimizer, rank_state, rank=rank, extra_models=extra_models,
                               with_frozen=with_frozen))
    if export_fn is not None:
        phase(lambda: export_fn(tmp / "hf"))
    phase(write_complete)
    phase(lambda: _record_and_rename(tmp, final, rank))
    if rank == 0:
        try:
            _prune(run_dir, keep_last)
            _prune_exports(run_dir, keep_exports)
        except OSError as err:  # the new checkpoint is complete: an old one left in place is only disk space
            log.warning("could not prune old checkpoints of %s: %s", run_dir, _describe(err)[0])
    barrier()
    return final


def _save_phase(body, *, rank: int, tmp: Path, final: Path, step: int, run_dir: str | Path) -> None:
    """Run one phase of a save on every rank; when it failed on any, rank 0 removes ``tmp`` and
    every rank raises the same SaveError."""
    failure = None
    try:
        body()
    except (Exception, CheckpointException) as err:  # DCP's wrapper is a BaseException
        failure = _describe(err)
    failure = _agree(failure)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise SaveError(f"could not save the checkpoint of step {step} to {final}: {failure[0]}; nothing of "
                        f"it was kept; the newest complete checkpoint is {newest_complete(run_dir)}")


def _make_empty_dir(tmp: Path, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)


def _write_state(tmp: Path, model, optimizer, rank_state: dict, *, rank: int, extra_models: dict | None,
                 with_frozen: bool) -> None:
    """Model, optimizer and ``extra_models`` through DCP (each rank its shards), then this
    rank's RNG states and ``rank_state``."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(with_frozen))
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    dcp.save(state, checkpoint_id=str(tmp / "state"))
    torch.save({"rng": rng_state(), **rank_state}, tmp / f"rank{rank}.pt")


def _record_and_rename(tmp: Path, final: Path, rank: int) -> None:
    recorded = manifest.record(tmp)  # every rank hashes its share (a collective; reading never raises)
    if rank == 0:
        manifest.write(tmp, recorded)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def _prune(run_dir: str | Path, keep_last: int) -> None:
    """Delete the full states of all but the newest ``keep_last`` checkpoints (exports stay;
    their manifests then list only what is left). Nothing is deleted or rewritten through a
    symbolic link: a checkpoint reached through one (``checkpoints/`` itself, the step folder,
    its ``state/`` or ``manifest.json``) may belong to another run, and is left as it is."""
    full = full_states(run_dir)
    for path in full[: max(len(full) - keep_last, 0)]:
        linked = [p for p in (path.parent, path, path / "state", path / manifest.MANIFEST) if p.is_symlink()]
        if linked:
            log.warning("not pruning %s: %s is a symbolic link, and a prune never deletes through one", path,
                        linked[0])
            continue
        ranks = [f.name for f in path.glob("rank*.pt")]
        manifest.drop(path, ["state", *ranks])  # first: a manifest never lists a file that is gone
        shutil.rmtree(path / "state", ignore_errors=True)
        for name in ranks:
            (path / name).unlink()


def _prune_exports(run_dir: str | Path, keep_exports: int) -> None:
    """Delete the ``hf/`` exports of all but the newest ``keep_exports`` checkpoints (0: keep all).

    Never deleted: the newest ``keep_exports`` exports (so the newest checkpoint's, when it has
    one), and the export of every checkpoint that still holds its full state (``keep_last``): a
    run resumed from one of those, or a fallback to the older one, has its export to evaluate.
    The small LoRA ``adapter/`` folders stay. As in ``_prune``, nothing is deleted through a
    symbolic link (``checkpoints/``, the step folder, its ``hf/`` or ``manifest.json``).
    """
    if keep_exports <= 0:
        return
    exports = list_exports(run_dir)
    resumable = {p.resolve() for p in full_states(run_dir)}
    for hf in exports[: max(len(exports) - keep_exports, 0)]:
        step_dir = hf.parent
        if step_dir.resolve() in resumable:
            continue
        linked = [p for p in (step_dir.parent, step_dir, hf, step_dir / manifest.MANIFEST) if p.is_symlink()]
        if linked:
            log.warning("not pruning the export %s: %s is a symbolic link, and a prune never deletes through one",
                        hf, linked[0])
            continue
        manifest.drop(step_dir, ["hf"])  # first: a manifest never lists a file that is gone
        shutil.rmtree(hf)


def _options(with_frozen: bool) -> StateDictOptions | None:
    # None keeps torch's defaults, so a run without LoRA saves and loads exactly as before.
    # Without the frozen weights, loading is not strict about them (they stay as loaded
    # from model.path); dcp.load still fails on any key the checkpoint lacks.
    return None if with_frozen else StateDictOptions(ignore_frozen_params=True, strict=False)


def load_training_state(path: str | Path, model, optimizer, *, rank: int, extra_models: dict | None = None,
                    with_frozen: bool | Callable[[int], bool] = True, verify: bool = True) -> tuple[dict, dict]:
    """Load model, optimizer (and ``extra_models``) in place; return (trainer_state, this rank's state).

    The run must have as many ranks as the one that saved it: data positions and RNG
    states are per rank. ``with_frozen``: as given to ``save_training_state``, or a function of the
    saved step that says what it was then. ``verify=False``
    skips the manifest check when the caller has just done it (``resolve_resume``).
    Everything that could be refused is read before the model or optimizer changes: the
    manifest check, this rank's state, the metadata and the non-tensor values. (A tensor
    that cannot be read is found while loading: after the manifest check, only in a file
    crafted together with its manifest; the ResumeError then ends the run.)
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        trainer_state = json.loads((path / COMPLETE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeError(f"{path / COMPLETE} cannot be read ({_first_line(err)})") from None
    if not isinstance(trainer_state, dict) or type(trainer_state.get("step")) is not int:
        raise ResumeError(f"{path / COMPLETE} has no step")
    if callable(with_frozen):
        with_frozen = with_frozen(trainer_state["step"])
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    saved_world = trainer_state.get("world_size", world)
    if saved_world != world:  # said by every rank alike, before any of them waits in a collective
        raise ResumeError(f"{path} was saved by {saved_world} processes; resume it with the same number of "
                          f"processes (now {world})")
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        raise ResumeError(f"{rank_file} is missing: resume with the same number of processes as the saved run")
    rank_state = load_rank_state(rank_file)  # an unsafe file is refused before anything changes
    check_dcp_values(path / "state")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(with_frozen))
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (extra_models or {}).items()})
    try:
        dcp.load(state, storage_reader=_SafeReader(path / "state"), planner=_SafeLoadPlanner())
    except CheckpointException as err:
        inner = [exc for exc, _ in err.failures.values()]
        refused = [e for e in inner if isinstance(e, ResumeError)]
        if refused:
            raise refused[0] from None
        raise ResumeError(f"{path / 'state'} cannot be loaded ({_describe(err)[0]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(with_frozen))
    for name, m in (extra_models or {}).items():
        set_model_state_dict(m, state[name])
    set_rng_state(rank_state.pop("rng"))
    return trainer_state, rank_state
