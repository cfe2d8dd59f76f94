"""What train.py and evaluate.py share on the command line.

* ``section.key=value`` overrides are recognised by their shape wherever they stand, so an
  option taking any number of values (``--checkpoint a b``) or an optional one (``--resume``)
  never swallows them.
* Errors a user can fix (a bad config, data file, clip, checkpoint or run directory) are
  printed as one line without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

# section.key=value, both names identifiers: a path such as runs/lr=1e-6 is not an override
OVERRIDE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (the other arguments, the overrides), each in its original order."""
    rest, overrides = [], []
    for arg in argv:
        (overrides if OVERRIDE.match(arg) else rest).append(arg)
    return rest, overrides


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


def run_reporting_errors(body: Callable[[], int], *, debug: bool) -> int:
    """``body()``; a user error is printed as one line (exit 2 for a config error, else 1)."""
    from grpo.config import ConfigError

    try:
        return body()
    except user_errors() as err:
        if debug:
            raise
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {err} (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 2 if isinstance(err, ConfigError) else 1
