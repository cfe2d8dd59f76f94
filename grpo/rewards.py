"""Rewards: each maps (completion text, sample) to a number; the trainer sums them, weighted.

R1-AQA's two rewards are ``accuracy`` and ``format`` (arXiv:2503.11197; docs/FACTS.md), each 0 or 1.
``think_format`` is the format reward of prompt <3>; ``mmau_match`` scores the answer
with the MMAU benchmark's own matching rule, for training on MMAU-style answers.
"""

from __future__ import annotations

import re
from typing import Callable

from data.datasets import Sample
from data.quote import quote
from data.scoring import extract_answer, is_correct

RewardFn = Callable[[str, Sample], float]

_FORMAT = re.compile(r"<answer>.*?</answer>", re.DOTALL)
_THINK_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def accuracy_reward(completion: str, sample: Sample) -> float:
    """1 if the answer (inside the first <answer> tag on one line, else the whole
    completion, stripped) equals the correct choice's text exactly, else 0."""
    return float(extract_answer(completion) == sample.answer)


def format_reward(completion: str, sample: Sample) -> float:
    """1 if the whole completion is ``<answer>...</answer>`` with nothing around it."""
    return float(_FORMAT.fullmatch(completion) is not None)


def think_format_reward(completion: str, sample: Sample) -> float:
    """1 if the whole completion is ``<think>...</think> <answer>...</answer>``."""
    return float(_THINK_FORMAT.fullmatch(completion) is not None)


def mmau_match_reward(completion: str, sample: Sample) -> float:
    """1 if the MMAU scorer (data/scoring.py) counts the extracted answer as correct."""
    return float(is_correct(extract_answer(completion), sample.answer, sample.choices))


REWARDS: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "think_format": think_format_reward,
    "mmau_match": mmau_match_reward,
}


def soft_overlong_punishment(length: int, max_length: int, buffer: int) -> float:
    """DAPO's length reward (arXiv:2503.14476, eq. 13) for a completion of ``length`` tokens:

        0                                   if length <= max_length - buffer
        (max_length - buffer - length) / buffer   in the buffer (from 0 down to -1)
        -1                                  if length > max_length

    It works on token counts, not on text, so the trainer computes it beside the rewards
    (``algorithm.overlong_buffer``, weighted by ``algorithm.overlong_penalty``, logged as
    ``overlong``). buffer 0 turns it off (always 0).
    """
    if buffer <= 0:
        return 0.0
    if length > max_length:
        return -1.0
    return min(0.0, (max_length - buffer - length) / buffer)


class RewardError(RuntimeError):
    """A reward function failed: the message names the reward and the sample."""


def check_reward_names(weights: dict[str, float]) -> None:
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown} in algorithm.rewards; known: {sorted(REWARDS)}")


def compute_rewards(
    completions: list[str], samples: list[Sample], weights: dict[str, float]
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of the configured rewards for each completion.

    Returns the totals ``[N]`` and each reward's unweighted values ``{name: [N]}`` for logging.
    """
    per_reward: dict[str, list[float]] = {}
    for name in weights:
        fn = REWARDS[name]
        values = []
        for completion, sample in zip(completions, samples):
            try:
                values.append(float(fn(completion, sample)))
            except Exception as err:  # name the sample: a bare traceback from deep in a loop helps no one
                raise RewardError(
                    f"reward '{name}' failed on sample id={quote(sample.id)} "
                    f"(completion {completion[:80]!r}): {type(err).__name__}: {err}"
                ) from err
        per_reward[name] = values
    totals = [sum(weights[n] * per_reward[n][i] for n in weights) for i in range(len(completions))]
    return totals, per_reward
