"""The run directory: one run at a time in it, and a fresh run never mixes with an old one.

``prepare_run_dir(path, resume=..., overwrite=...)`` (rank 0, before anything is written):

1. takes ``<run>/run.lock``: an exclusive ``fcntl.flock`` held for the run's lifetime, with
   the holder's pid, host and start time inside. A lock held by a live process refuses the
   second run, naming that process. The kernel drops a flock when its process dies, so a lock
   file that can be taken although it names a pid is a stale lock of a run that did not exit
   cleanly: reported, and taken over;
2. a fresh run (no ``--resume``) into a directory that already holds a run refuses, unless
   ``run.overwrite: true``, which first moves the old run aside to
   ``<run>.replaced-<YYYYmmdd-HHMMSS>`` (nothing is deleted). A directory with no completed
   step in it (no history line, no checkpoint: what a start that failed leaves, its
   ``config.yaml`` and an empty ``tb/``) holds no run: a fresh start clears those and uses it.

:func:`check_run_dir` is step 2 alone, read-only: every rank runs it before the process group
exists, so a refused directory stops every rank alike.

``record_config(run_dir, config, checkpoint, allow_change=...)`` then writes the resolved
config: ``config.yaml`` for a fresh run; on a resume it compares the new config with the one
the checkpoint's run saved. A change to a key that alters the optimisation or the data order
(:func:`grpo.config.changes_the_run`) is a ConfigError listing each key with both values,
unless ``allow_change``; accepted changes are logged and the new config is written next to
the original as ``config.resume-step<N>.yaml``. ``config.yaml`` is never rewritten on a resume.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from grpo.config import Config, ConfigError, changes_the_run, config_changes, save_config, to_dict

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message names it and the way out."""


class RunLock:
    """An exclusive flock on ``<run>/run.lock``, held until :meth:`release` (or process exit)."""

    def __init__(self, run_dir: Path, file, previous: dict | None):
        self.run_dir, self.path, self._file = run_dir, run_dir / LOCK_NAME, file
        self.previous = previous  # what a stale lock file said, or None

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order: a run that opens the file
        between the two finds the old inode and retries)."""
        if self._file is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return "this very process (an earlier trainer in it was not closed)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(run_dir: str | Path) -> RunLock:
    """Take ``<run_dir>/run.lock`` (creating the directory) or raise RunDirError naming the holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    while True:
        file = open(path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise RunDirError(f"{run_dir} is in use by another run: {_describe(_read_holder(path))} holds "
                              f"{path}. Wait for it to finish, stop it, or choose another run.output_dir") from None
        # the holder may have removed the file between our open and our flock: then we hold
        # a lock on a deleted inode, and must start again on the file that is there now
        try:
            same = os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        file.close()
    previous = _read_holder(path)
    if previous:  # the file was left behind: its run ended without releasing it
        here = previous.get("host") == socket.gethostname()
        state = ("its pid now belongs to another process" if here and _pid_alive(previous.get("pid"))
                 else "that process is gone" if here else "on another host, and no longer holding it")
        logger.warning("%s: stale lock from %s: %s (that run did not exit cleanly); taking it over",
                       path, _describe(previous), state)
    file.seek(0)
    file.truncate()
    file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    file.flush()
    return RunLock(run_dir, file, previous or None)


def _contents(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) if run_dir.is_dir() else []


# what a start that failed before its first step leaves (the config it was given, the
# TensorBoard writer's first file, an empty history or checkpoint folder)
_START_LEFTOVERS = {"config.yaml", "tb", "history.jsonl", "checkpoints"}


def _empty(path: Path) -> bool:
    if path.is_dir():
        return not any(path.iterdir())
    if not path.exists():
        return True
    with path.open("rb") as f:
        return not f.read(4096).strip()


def holds_a_run(run_dir: str | Path) -> list[str]:
    """The entries of ``run_dir`` that make it a run (empty when it holds none): anything but the
    leftovers of a failed start, or those when a step completed (a history line, a checkpoint)."""
    run_dir = Path(run_dir)
    found = _contents(run_dir)
    leftovers_only = set(found) <= _START_LEFTOVERS and _empty(run_dir / "history.jsonl") \
        and _empty(run_dir / "checkpoints") \
        and all(p.name.startswith("events.out.tfevents.") for p in (run_dir / "tb").glob("*"))
    return [] if leftovers_only else found


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step_*/trainer_state.json"))


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """RunDirError when a fresh run may not start in ``run_dir`` (see the module doc); no side effect."""
    run_dir = Path(run_dir)
    found = holds_a_run(run_dir)
    if resume or overwrite or not found:
        return
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    way_on = ("Continue it with --resume" if _has_checkpoint(run_dir) else
              "It has no checkpoint to continue from (--resume would have nothing to load)")
    raise RunDirError(f"{run_dir} already holds a run ({shown}). {way_on}, choose another run.output_dir, "
                      "or set run.overwrite=true to move it aside first")


def _clear_leftovers(run_dir: Path) -> None:
    """Remove what a failed start left (``holds_a_run`` found no run): a fresh start owns the directory."""
    import shutil

    left = _contents(run_dir)
    if not left:
        return
    for name in left:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.info("%s holds no completed step (left by a start that failed: %s): using it", run_dir, ", ".join(left))


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while candidate.exists():
        candidate, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    return candidate


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock the run directory and make sure a fresh run starts in an empty one (see the module doc)."""
    run_dir = Path(run_dir)
    lock = acquire_lock(run_dir)
    if resume:
        if overwrite:
            logger.warning("--resume given: run.overwrite is ignored, %s is continued", run_dir)
        return lock
    if not holds_a_run(run_dir):
        _clear_leftovers(run_dir)
        return lock
    if not overwrite:
        lock.release()
        check_run_dir(run_dir, resume=False, overwrite=False)  # raises, naming what is there
    aside = _aside_name(run_dir)
    run_dir.rename(aside)  # our lock moves with it: no other run can take the old directory meanwhile
    new_lock = acquire_lock(run_dir)
    lock.path = aside / LOCK_NAME
    lock.release()
    logger.warning("run.overwrite=true: the previous run in %s was moved to %s", run_dir, aside)
    return new_lock


def record_config(run_dir: str | Path, config: Config, checkpoint: Path | None, *, allow_change: bool) -> Path:
    """Write the run's resolved config (see the module doc); returns the file written."""
    run_dir = Path(run_dir)
    target = run_dir / "config.yaml"
    if checkpoint is None:  # a fresh run: the directory was checked to be empty (or --resume found nothing)
        save_config(config, target)
        return target
    checkpoint = Path(checkpoint)
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    saved_path = checkpoint.parent.parent / "config.yaml"  # the config of the run that wrote the checkpoint
    if not saved_path.is_file():
        logger.warning("%s not found: the configuration of the resumed run cannot be compared", saved_path)
        changes = []
    else:
        # keys added since the run was saved (e.g. lora.*) are no change at their defaults
        changes = config_changes(yaml.safe_load(saved_path.read_text()) or {}, to_dict(config),
                                 defaults=to_dict(type(config)()))
    blocking = [c for c in changes if changes_the_run(c[0])]
    if blocking and not allow_change:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in blocking)
        raise ConfigError(f"--resume from {checkpoint} with a configuration that differs from {saved_path} in "
                          f"keys that change the optimisation or the data order: {listed}. Resume with the saved "
                          "values, or pass --allow-config-change to continue with the new ones on purpose")
    for key, old, new in changes:
        (logger.warning if changes_the_run(key) else logger.info)(
            "resuming with %s changed: %r -> %r", key, old, new)
    if not target.is_file():  # resuming another run's checkpoint into a new directory
        save_config(config, target)
        return target
    if not changes:
        return target
    written = run_dir / f"config.resume-step{step}.yaml"
    save_config(config, written)
    logger.info("the resumed run's configuration is in %s (%s keeps the original)", written, target)
    return written


def truncate_history(run_dir: str | Path, step: int) -> None:
    """Drop the lines of ``history.jsonl`` after ``step``: a run that crashed after its last
    checkpoint logged steps that the resumed run will log again."""
    path = Path(run_dir) / "history.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            path.write_text("".join(kept))
            logger.info("history.jsonl: dropped %d line(s) after step %d", len(lines) - len(kept), step)
