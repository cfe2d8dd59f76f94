"""A deterministic, resumable stream of training questions for one rank.

Every epoch is a permutation drawn from ``(seed, epoch)``; rank r takes positions
r, r + W, r + 2W, ... of it, so ranks never see the same question in an epoch and the
whole order is a pure function of the seed. The stream's position (epoch, cursor) is
all a checkpoint needs to continue exactly where a run stopped.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from data.audio import AudioError
from data.datasets import Sample

logger = logging.getLogger(__name__)


class PromptStream:
    """Yields ``(sample, waveform)`` pairs for one rank, skipping (and counting) what it must.

    A sample is skipped when its audio cannot be read and ``on_error == "skip"`` (else the
    AudioError, which names the file, stops the run), or when ``keep(sample, waveform)``
    says no (for example, a prompt longer than the configured limit).
    """

    def __init__(
        self,
        samples: list[Sample],
        load_audio: Callable[[str], np.ndarray],
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        on_error: str = "raise",
        keep: Callable[[Sample, np.ndarray], bool] | None = None,
        silence: bool = False,
    ):
        if len(samples) < world_size:
            raise ValueError(f"{len(samples)} training questions cannot feed {world_size} ranks")
        self.samples, self.load_audio = samples, load_audio
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle, self.on_error, self.keep, self.silence = shuffle, on_error, keep, silence
        self.epoch, self.cursor = 0, 0
        self.last_position, self.positions = -1, []
        self.skipped = {"audio": 0, "filtered": 0}
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        n = len(self.samples) // self.world_size * self.world_size  # equal share for every rank
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.samples), generator=g)[:n].tolist()
        else:
            order = list(range(n))
        return order[self.rank :: self.world_size]

    def _advance(self) -> tuple[Sample, int]:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        sample = self.samples[self._order[self.cursor]]
        # the position in the stream all ranks share: the same on 1 rank or W ranks
        position = (self.epoch * len(self._order) + self.cursor) * self.world_size + self.rank
        self.cursor += 1
        return sample, position

    def next(self) -> tuple[Sample, np.ndarray]:
        for _ in range(10 * len(self._order) + 10):  # bounded: a set where nothing loads is an error
            sample, self.last_position = self._advance()
            try:
                wave = self.load_audio(sample.audio_path)
            except AudioError as err:
                where = sample.where
                if self.on_error != "skip":
                    raise AudioError(err.path, err.reason, sample=where) from None
                self.skipped["audio"] += 1
                logger.warning("skipping %s (%d audio skips so far): %s: %s", where, self.skipped["audio"], err.path,
                               err.reason)
                continue
            if self.silence:  # control experiment: the question stays, the signal goes
                wave = np.zeros_like(wave)
            if self.keep is not None and not self.keep(sample, wave):
                self.skipped["filtered"] += 1
                if self.skipped["filtered"] in (1, 10, 100, 1000) or self.skipped["filtered"] % 10_000 == 0:
                    logger.warning("%d prompt(s) dropped as too long so far", self.skipped["filtered"])
                continue
            return sample, wave
        raise RuntimeError("no usable training sample: every question was skipped (see the warnings above)")

    def take(self, n: int) -> tuple[list[Sample], list[np.ndarray]]:
        """The next n usable questions; their global stream positions are left in ``positions``."""
        pairs, self.positions = [], []
        for _ in range(n):
            pairs.append(self.next())
            self.positions.append(self.last_position)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.skipped = dict(state["skipped"])
        self._order = self._epoch_order()
