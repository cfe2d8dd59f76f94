"""R1-AQA's rewards (docs/FACTS.md) and their failure messages."""

import pytest

from data.datasets import Sample
from grpo.rewards import (
    RewardError,
    accuracy_reward,
    check_reward_names,
    compute_rewards,
    format_reward,
    mmau_match_reward,
    soft_overlong_punishment,
    think_format_reward,
)

S = Sample(id="q1", audio_path="/a.wav", question="Which?", choices=["Dog barking", "Cat", "Bird"],
           answer="Dog barking", task=None)


@pytest.mark.parametrize("text, expected", [
    ("<answer>Dog barking</answer>", 1.0),
    ("<answer> Dog barking </answer>", 1.0),  # stripped
    ("Dog barking", 1.0),  # no tag: the whole completion
    ("<answer>Cat</answer>", 0.0),
    ("<answer>dog barking</answer>", 0.0),  # exact match, as R1-AQA
    ("<answer>Dog</answer>", 0.0),
    ("", 0.0),
])
def test_accuracy(text, expected):
    assert accuracy_reward(text, S) == expected


@pytest.mark.parametrize("text, expected", [
    ("<answer>Cat</answer>", 1.0),
    ("<answer>\nCat\n</answer>", 1.0),
    ("I think <answer>Cat</answer>", 0.0),  # nothing around the tags
    ("<answer>Cat</answer> done", 0.0),
    ("<answer>Cat", 0.0),
])
def test_format(text, expected):
    assert format_reward(text, S) == expected


def test_think_format():
    assert think_format_reward("<think>it barks</think> <answer>Dog barking</answer>", S) == 1.0
    assert think_format_reward("<think>it barks</think><answer>Dog barking</answer>", S) == 1.0
    assert think_format_reward("<answer>Dog barking</answer>", S) == 0.0


def test_mmau_match_is_more_lenient_than_exact_accuracy():
    assert mmau_match_reward("<answer>(A) Dog barking</answer>", S) == 1.0 or \
        mmau_match_reward("<answer>Dog barking.</answer>", S) == 1.0
    assert mmau_match_reward("<answer>Cat</answer>", S) == 0.0


def test_weighted_sum_and_per_reward_values():
    texts = ["<answer>Dog barking</answer>", "<answer>Cat</answer>", "Dog barking"]
    totals, per = compute_rewards(texts, [S] * 3, {"accuracy": 1.0, "format": 0.5})
    assert totals == [1.5, 0.5, 1.0]
    assert per == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0]}


def test_a_failing_reward_names_the_reward_and_the_sample(monkeypatch):
    from grpo import rewards

    def needs_task(text, sample):
        return float(sample.task.lower() in text)  # a sample without a task breaks it

    monkeypatch.setitem(rewards.REWARDS, "needs_task", needs_task)
    broken = Sample(id="broken-7", audio_path="/a.wav", question="?", choices=["a"], answer="a", task=None)
    with pytest.raises(RewardError, match=r"reward 'needs_task' failed on sample id='broken-7'.*AttributeError"):
        compute_rewards(["<answer>a</answer>"], [broken], {"needs_task": 1.0})


def test_unknown_reward_names_are_listed():
    with pytest.raises(ValueError, match="accuracy"):
        check_reward_names({"acuracy": 1.0})


@pytest.mark.parametrize("length,expected", [(0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0)])
def test_soft_overlong_punishment(length, expected):
    """DAPO's ramp, max 16 tokens with a buffer of 4: 0 up to 12, then -1/4 per token, -1 past 16."""
    assert soft_overlong_punishment(length, 16, 4) == pytest.approx(expected)
    assert soft_overlong_punishment(length, 16, 0) == 0.0
