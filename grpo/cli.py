"""What train.py and evaluate.py share on the command line.

* ``section.key=value`` overrides are recognised by their shape wherever they stand, so an
  option taking any number of values (``--checkpoint a b``) or an optional one (``--resume``)
  never swallows them.
* Errors a user can fix (a bad config, data file, clip, checkpoint or run directory) are
  printed as one line without a traceback; ``--debug`` shows the traceback.
* Under torchrun, an error that every rank meets alike (raised inside :func:`alike_on_every_rank`:
  the config and input files, checked before the process group exists, or rank 0's verdict
  shared with the others) is printed by local rank 0 only, and every rank exits with the same
  status (torchrun stops the remaining ranks as soon as one exits non-zero, so they leave
  together: see ``_leave_together``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable, Sequence

# section.key=value, both names identifiers: a path such as runs/lr=1e-6 is not an override
OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (the other arguments, the overrides), each in its original order."""
    rest, overrides = [], []
    for arg in argv:
        (overrides if OVERRIDE.match(arg) else rest).append(arg)
    return rest, overrides


# key=value without a section: a mistyped override, not a file or an option
BARE_OVERRIDE = re.compile(r"^[A-Za-z_]\w*=")


def bare_override_hint(argv: Sequence[str], config_class) -> str | None:
    """For the first ``key=value`` in ``argv`` (no section), the line saying overrides are
    ``section.key=value``, with the closest key of ``config_class`` (a dataclass of sections); or None."""
    import dataclasses
    import difflib

    bare = next((a for a in argv if BARE_OVERRIDE.match(a)), None)
    if bare is None:
        return None
    key, value = bare.split("=", 1)
    dotted = {f"{s.name}.{k.name}": k.name for s in dataclasses.fields(config_class)
              for k in dataclasses.fields(s.default_factory())}
    same = [d for d, k in dotted.items() if k == key]
    close = same or difflib.get_close_matches(key, list(dotted.values()), n=1, cutoff=0.5)
    if close and not same:
        same = [d for d, k in dotted.items() if k == close[0]]
    hint = f"; did you mean {' or '.join(f'{d}={value}' for d in same)}?" if same else ""
    return f"'{bare}': an override is section.key=value{hint}"


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message says what is wrong and how to fix it."""
    from data.audio import AudioError
    from data.datasets import DataError
    from grpo.checkpoint import ResumeError, SaveError
    from grpo.config import ConfigError
    from grpo.rewards import RewardError
    from grpo.rundir import RunDirError
    from models.loading import CheckpointError

    return (ConfigError, DataError, AudioError, CheckpointError, ResumeError, SaveError, RunDirError,
            RewardError)


def same_on_every_rank(err: BaseException) -> BaseException:
    """Mark ``err`` as one that every rank raises alike (so one of them reports it); returns it."""
    err.same_on_every_rank = True
    return err


@contextmanager
def alike_on_every_rank():
    """User errors raised inside are ones every rank meets alike: the same config and files,
    read before any rank-specific work (see the module doc)."""
    try:
        yield
    except user_errors() as err:
        raise same_on_every_rank(err)


def _launched_ranks() -> int:
    """Processes torchrun started on this machine (1 when not launched by it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else 1


def _arrivals(wait_s: float):
    """A counter of this machine's ranks that met the error, in torchrun's own store (the one
    the process group would use), or None when it cannot be reached."""
    try:
        import datetime

        from torch.distributed import TCPStore

        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=wait_s))
    except Exception:  # no store: the ranks fall back on waiting
        return None
    key = "audio_grpo/user_error/{}/{}".format(os.environ.get("GROUP_RANK", "0"),
                                               os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return lambda: store.add(key, 1), lambda: store.add(key, 0)


def _leave_together(status: int, reporting: bool, wait_s: float) -> None:
    """Every rank of this machine exits with ``status``, the reporting one first and only once
    all have met the error: torchrun stops the others (SIGTERM) as soon as one rank exits, so a
    rank still starting up would die with -15, and a reporting rank stopped early would print
    nothing. A rank stopped from here on exits with ``status``; ``wait_s`` bounds every wait."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(status))
    counter = _arrivals(wait_s)
    deadline = time.monotonic() + wait_s
    if counter is not None:
        arrive, count = counter
        arrive()
        while reporting and count() < int(os.environ.get("LOCAL_WORLD_SIZE", "1")) and time.monotonic() < deadline:
            time.sleep(0.05)
    if not reporting:
        time.sleep(max(deadline - time.monotonic(), 0.0))


def _tell_torchrun(line: str) -> None:
    """Under torchrun, ``line`` in the error file it reads: its failure report then shows the
    error instead of a link to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json

    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:  # the report is torchrun's: without the file it links its documentation
        pass


def run_reporting_errors(body: Callable[[], int], *, debug: bool, wait_s: float = 30.0) -> int:
    """``body()``; a user error is printed as one line (exit 2 for a config error, else 1).

    Under torchrun, an error marked :func:`same_on_every_rank` is printed by local rank 0 alone,
    and the ranks leave together with the same status (``_leave_together``; ``wait_s`` at most).
    """
    from grpo.config import ConfigError

    try:
        return body()
    except user_errors() as err:
        if debug:
            raise
        status = 2 if isinstance(err, ConfigError) else 1
        together = getattr(err, "same_on_every_rank", False) and _launched_ranks() > 1
        reporting = not together or int(os.environ.get("LOCAL_RANK", "0")) == 0
        if reporting:
            kind = "config error" if isinstance(err, ConfigError) else "error"
            line = f"{kind}: {err} (--debug shows the traceback)"
            print(line, file=sys.stderr, flush=True)
            _tell_torchrun(line)
        if together:
            _leave_together(status, reporting, wait_s)
        return status
