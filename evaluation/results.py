"""What an evaluation sweep is about and what it gives back, per checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # output folder name, unique among the checkpoints of one invocation
    path: Path  # the transformers-format directory
    step: int  # parsed from step_<N> in the path; 0 for a base model


@dataclass
class CheckpointResult:
    checkpoint: CheckpointRef
    out_dir: Path
    scores: dict | None  # None for a benchmark without answers
    missing_audio: list[str]  # ids of the questions skipped (unreadable audio or over-long prompt)
    left_out: int  # questions left out of the scores (skip_missing_audio)
    reused: bool  # predictions reused from an earlier run
