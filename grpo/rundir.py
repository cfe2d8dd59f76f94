"""The run directory: one run at a time in it, and a fresh run never mixes with an old one.

``prepare_run_dir(path, resume=..., overwrite=...)`` (rank 0, before anything is written):

1. takes ``<run>/run.lock``: an exclusive ``fcntl.flock`` held for the run's lifetime, with
   the holder's pid, host and start time inside. A lock held by a live process refuses the
   second run, naming that process, before anything is said about what the directory holds.
   The kernel drops a flock when its process dies, so a lock file that can be taken although
   it names a pid is a stale lock of a run that did not exit cleanly: reported, and taken over.
   A directory that cannot be created (no permission, a read-only mount) is one line;
2. a directory holding anything that neither a run nor evaluate.py beside it (``eval/``)
   writes (a folder of the user's files, a home directory) is refused, whatever the options:
   it is never cleared, moved or written into;
3. ``--resume`` into a directory with a symbolic link anywhere in it is refused: a run
   directory is copied, synced and shared, and a resumed run would append, write or prune
   through the link, outside the directory;
4. a fresh run (no ``--resume``) into a directory that already holds a run refuses, unless
   ``run.overwrite: true``, which first moves the old run aside to
   ``<run>.replaced-<YYYYmmdd-HHMMSS>`` (nothing is deleted; links move as links). A directory
   with no completed step in it (no history line, no checkpoint: what a start that failed
   leaves, its ``config.yaml`` and an empty ``tb/``) holds no run: a fresh start clears those
   (a link among them is removed itself, not what it points to) and uses it.

:func:`check_run_dir` is steps 1 (without taking the lock) to 4, read-only: every rank runs it
before the process group exists, so a refused directory stops every rank alike.

``record_config(run_dir, config, checkpoint, allow_change=...)`` then writes the resolved
config: ``config.yaml`` for a fresh run; on a resume it compares the new config with the one
the checkpoint's run saved. A change to a key that alters the optimisation or the data order
(:func:`grpo.config.changes_the_run`) is a ConfigError listing each key with both values,
unless ``allow_change``; accepted changes are logged and the new config is written next to
the original as ``config.resume-step<N>.yaml``. ``config.yaml`` is never rewritten on a resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from data.quote import cut, quote
from grpo.config import Config, ConfigError, changes_the_run, config_changes, load_yaml, save_config, to_dict

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
    """What ``run.lock`` says (pid, host, start time); {} when it says nothing readable. At most
    4 KiB are read, and never through a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            holder = json.loads(f.read(4096) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        return "this very process (an earlier trainer in it was not closed)"
    return (f"pid {cut(holder.get('pid'), 20)} on {cut(holder.get('host'), 80)} "
            f"(started {cut(holder.get('started'), 40)})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err} [errno {errno.errorcode.get(err.errno, err.errno)}]"


def _in_use(run_dir: Path, path: Path) -> RunDirError:
    return RunDirError(f"{run_dir} is in use by another run: {_describe(_read_holder(path))} holds {path}. "
                       "Wait for it to finish, stop it, or choose another run.output_dir")


def _not_a_link(path: Path) -> None:
    if path.is_symlink():
        raise RunDirError(f"{path} is a symbolic link (to {cut(os.readlink(path), 200)}): a run never writes "
                          "through a link; remove it, or choose another run.output_dir")


def check_not_in_use(run_dir: str | Path) -> None:
    """RunDirError when a live process holds ``<run_dir>/run.lock``; no side effect. A shared lock,
    taken and dropped at once, conflicts only with a run's exclusive one: the ranks of one run
    may all check at the same time."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    _not_a_link(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return  # no lock file (or none this user can read): acquire_lock says what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, path) from None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def acquire_lock(run_dir: str | Path) -> RunLock:
    """Take ``<run_dir>/run.lock`` (creating the directory) or raise RunDirError naming the holder,
    or the reason the directory or the lock cannot be made (one line: no permission, read-only)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"run.output_dir {run_dir} exists and is not a directory") from None
    except OSError as err:
        raise RunDirError(f"run.output_dir {run_dir} cannot be created: {_os_error(err)} ({err.filename}); "
                          "choose a run.output_dir you can write to") from None
    path = run_dir / LOCK_NAME
    _not_a_link(path)
    while True:
        try:  # O_NOFOLLOW: a link put in the lock's place is never truncated or written through
            file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as err:
            if err.errno == errno.ELOOP:
                _not_a_link(path)
            raise RunDirError(f"{path} cannot be created: {_os_error(err)}; choose a run.output_dir you can "
                              "write to") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise _in_use(run_dir, path) from None
        # the holder may have removed the file between our open and our flock: then we hold
        # a lock on a deleted inode, and must start again on the file that is there now
        try:
            same = os.fstat(file.fileno()).st_ino == os.lstat(path).st_ino
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
    if not run_dir.is_dir():
        return []
    try:
        return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME)
    except OSError as err:
        raise RunDirError(f"run.output_dir {run_dir} cannot be read: {_os_error(err)}") from None


# what a start that failed before its first step leaves (the config it was given, the
# TensorBoard writer's first file, an empty history or checkpoint folder)
_START_LEFTOVERS = {"config.yaml", "tb", "history.jsonl", "checkpoints"}
# every name the trainer writes at the top of a run directory (besides run.lock)
_RESUMED_CONFIG = re.compile(r"^config\.resume-step\d+\.yaml$")


# evaluate.py's results when its output.dir is inside the run (configs/eval_tiny.yaml: runs/tiny/eval)
_EVALUATION = "eval"


def _written_by_a_run(name: str) -> bool:
    return name in _START_LEFTOVERS or name == _EVALUATION or _RESUMED_CONFIG.match(name) is not None


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


def foreign_entries(run_dir: str | Path) -> list[str]:
    """The entries of ``run_dir`` that no run writes: a directory holding any is not a run
    directory (a folder of the user's files, a home directory), and is never moved or cleared."""
    return [name for name in _contents(Path(run_dir)) if not _written_by_a_run(name)]


def links_in(run_dir: str | Path, limit: int = 5) -> list[Path]:
    """Symbolic links anywhere inside ``run_dir`` (not followed), the first ``limit`` of them.
    A run directory is copied, synced and shared; a link in it would make a resumed run write,
    append or prune outside it."""
    found = []
    for top, dirs, files in os.walk(run_dir, followlinks=False):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(top, name)):
                found.append(Path(top) / name)
                if len(found) >= limit:
                    return found
    return found


def _shown(names: list[str]) -> str:
    return ", ".join(cut(n, 60) for n in names[:5]) + (", ..." if len(names) > 5 else "")


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("step_*/trainer_state.json"))


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """RunDirError when a run may not start in ``run_dir`` (see the module doc); no side effect.
    In this order: another run holds it; it holds files no run writes; (``resume``) it holds a
    link; (a fresh run) it already holds a run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run.output_dir {run_dir} exists and is not a directory")
    check_not_in_use(run_dir)
    _check_contents(run_dir, resume=resume, overwrite=overwrite)


def _check_contents(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    foreign = foreign_entries(run_dir)
    if foreign:
        raise RunDirError(f"{run_dir} is not a run directory: it holds files no run writes ({_shown(foreign)}). "
                          "A run starts only in an empty directory or its own, and run.overwrite moves aside "
                          "only a run: choose another run.output_dir")
    if resume:
        links = links_in(run_dir)
        if links:
            raise RunDirError(f"{links[0]} is a symbolic link (to {cut(os.readlink(links[0]), 200)}): a resumed "
                              "run would write, append or prune through it, outside its directory. Replace it "
                              "with what it points to, or resume into another run.output_dir")
        return
    found = holds_a_run(run_dir)
    if overwrite or not found:
        return
    way_on = ("Continue it with --resume" if _has_checkpoint(run_dir) else
              "It has no checkpoint to continue from (--resume would have nothing to load)")
    raise RunDirError(f"{run_dir} already holds a run ({_shown(found)}). {way_on}, choose another run.output_dir, "
                      "or set run.overwrite=true to move it aside first")


def _clear_leftovers(run_dir: Path) -> None:
    """Remove what a failed start left (``holds_a_run`` found no run): a fresh start owns the
    directory. A link is removed itself, never what it points to."""
    import shutil

    left = _contents(run_dir)
    if not left:
        return
    for name in left:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    logger.info("%s holds no completed step (left by a start that failed: %s): using it", run_dir, ", ".join(left))


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    return candidate


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock the run directory and make sure a fresh run starts in an empty one (see the module doc)."""
    run_dir = Path(run_dir)
    lock = acquire_lock(run_dir)  # first: a directory in use is said before anything about its contents
    try:
        _check_contents(run_dir, resume=resume, overwrite=overwrite)
    except BaseException:
        lock.release()
        raise
    if resume:
        if overwrite:
            logger.warning("--resume given: run.overwrite is ignored, %s is continued", run_dir)
        return lock
    if not holds_a_run(run_dir):
        _clear_leftovers(run_dir)
        return lock
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
        changes = config_changes(load_yaml(saved_path.read_text(), str(saved_path)) or {}, to_dict(config),
                                 defaults=to_dict(type(config)()))
    blocking = [c for c in changes if changes_the_run(c[0])]
    if blocking and not allow_change:
        listed = "; ".join(f"{key}: {quote(old)} -> {quote(new)}" for key, old, new in blocking)
        raise ConfigError(f"--resume from {checkpoint} with a configuration that differs from {saved_path} in "
                          f"keys that change the optimisation or the data order: {listed}. Resume with the saved "
                          "values, or pass --allow-config-change to continue with the new ones on purpose")
    for key, old, new in changes:
        (logger.warning if changes_the_run(key) else logger.info)(
            "resuming with %s changed: %s -> %s", key, quote(old), quote(new))
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
    checkpoint logged steps that the resumed run will log again. A line that is not a step's
    record (cut short by a kill mid-write) is dropped too, and counted."""
    path = Path(run_dir) / "history.jsonl"
    _not_a_link(path)
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in lines if _step_of_line(line) is not None and _step_of_line(line) <= step]
    if len(kept) < len(lines):
        path.write_text("".join(kept))
        logger.info("history.jsonl: dropped %d line(s) after step %d or not a step's record", len(lines) - len(kept),
                    step)


def _step_of_line(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    value = record.get("step") if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
