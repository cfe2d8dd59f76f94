import re

import pytest

from data.prompts import answer_target, build_messages, format_prompt

Q = "What is the sound source in the audio?"
C = ["dog", "cat's toy", "car"]


def test_templates_match_r1_aqa_literally():
    assert format_prompt(Q, C, 1) == (
        "What is the sound source in the audio? Please choose the answer from the following options: "
        "['dog', \"cat's toy\", 'car'].")
    assert format_prompt(Q, C, "2") == (
        "What is the sound source in the audio? Please choose the answer from the following options: "
        "['dog', \"cat's toy\", 'car']. Output the final answer in <answer> </answer>.")
    assert format_prompt(Q, ("a", "b"), 3) == (
        "What is the sound source in the audio? Please choose the answer from the following options: "
        "['a', 'b']. Output the thinking process in <think> </think> and final answer in <answer> </answer>.")


@pytest.mark.parametrize("bad", [0, 4, "<2>", "two", None, True, 2.5])
def test_unknown_template_is_rejected(bad):
    with pytest.raises(ValueError):
        format_prompt(Q, C, bad)
    with pytest.raises(ValueError):
        answer_target("dog", bad)


def test_build_messages_is_one_user_turn_audio_then_text():
    m = build_messages("hello")
    assert len(m) == 1 and m[0]["role"] == "user"
    audio, text = m[0]["content"]
    assert audio["type"] == "audio" and "audio_url" in audio
    assert text == {"type": "text", "text": "hello"}


def test_answer_targets():
    assert answer_target("car", 1) == "car"
    assert answer_target("car", 2) == "<answer>car</answer>"
    assert answer_target("car", "3") == "<think></think><answer>car</answer>"
    # the targets earn the format reward of their template (R1-AQA's format reward)
    assert re.fullmatch(r"<answer>.*?</answer>", answer_target("car", 2), re.S)
    assert re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", answer_target("car", 3), re.S)
