"""What a run carries from one step to the next besides the weights and AdamW's moments, and
what it does when a signal comes.

``RunState``: the step number, the optimizer counters and this rank's position in the
question stream; it snapshots itself (with every RNG) before a step, so a step that fails
before it updated the weights can be undone, and it writes and reads the part a checkpoint
holds. ``SignalStop``: the first SIGTERM/SIGINT asks for a checkpoint after the running
step and then a stop; a second stops at once.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field, replace

import torch

from grpo.checkpoint import rng_state, set_rng_state
from grpo.step import Counters
from grpo.stream import PromptStream
from models.collectives import all_reduce

logger = logging.getLogger("grpo.trainer")


@dataclass(frozen=True)
class Snapshot:
    """A ``RunState`` as it was: restored when the step that followed failed before any update."""

    step: int
    counters: Counters
    stream: dict
    rng: dict


@dataclass
class RunState:
    """The step number (completed steps, format warm-up included), the counters the optimizer
    steps keep, and this rank's question stream."""

    stream: PromptStream
    step: int = 0
    counters: Counters = field(default_factory=Counters)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.step, replace(self.counters), self.stream.state_dict(), rng_state())

    def restore(self, snapshot: Snapshot) -> None:
        """Back to ``snapshot``: step, counters, the stream's position and every RNG."""
        self.step, self.counters = snapshot.step, replace(snapshot.counters)
        self.stream.load_state_dict(snapshot.stream)
        set_rng_state(snapshot.rng)

    def saved(self, world: int) -> tuple[dict, dict]:
        """(what every rank's checkpoint shares, this rank's own), as ``save_training_state`` takes them."""
        c = self.counters
        return {"update": c.update, "nonfinite_total": c.nonfinite_total, "world_size": world}, \
            {"stream": self.stream.state_dict()}

    def load(self, trainer_state: dict, rank_state: dict) -> None:
        """The state a checkpoint saved (``load_training_state``'s two dicts)."""
        self.step, self.counters.update = trainer_state["step"], trainer_state["update"]
        self.counters.nonfinite_total = trainer_state.get("nonfinite_total", 0)
        self.stream.load_state_dict(rank_state["stream"])


class SignalStop:
    """With ``enabled``, SIGTERM and SIGINT ask the run to save and stop after the running step
    (``received``: the signal's number, 0 for none); a second signal raises KeyboardInterrupt."""

    def __init__(self, enabled: bool):
        self.received = 0
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        logger.warning("signal %d: saving a checkpoint after this step, then stopping", signum)
        self.received = signum

    def on_any_rank(self, device: torch.device) -> int:
        """The signal any rank received (a collective: every rank stops after the same step), or 0."""
        return int(all_reduce(torch.tensor([float(self.received)]), device, "max").item())
