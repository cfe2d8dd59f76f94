"""MMAU scoring rules (docs/FACTS.md, "MMAU scoring") on the cases that trip up ad-hoc scorers."""

import json
import logging
from pathlib import Path

import pytest

from data.scoring import extract_answer, is_correct, score, score_report, tokenize

MMAU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmau"
GENDER = ["Man", "Woman", "Child", "Robot"]


# --- extract_answer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>Man</answer>", "Man"),
        ("  <answer>  Man \t</answer>  ", "Man"),  # stripped inside the tag
        ("<think>a man\nspeaks</think>\n<answer>Woman</answer>", "Woman"),
        ("<answer>Woman</answer> then <answer>Man</answer>", "Woman"),  # the first pair wins
        # a pair crossing a newline is not taken: the next one-line pair is
        ("<answer>Man\n</answer> <answer>Child</answer>", "Child"),
        # no one-line pair at all: the whole output, stripped
        ("<answer>\nMan\n</answer>\n", "<answer>\nMan\n</answer>"),
        ("  The answer is Man.\n", "The answer is Man."),
        ("<answer></answer>", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_tokenize_lowercases_and_splits_on_word_boundaries():
    assert tokenize("Man, WOMAN; rock_music 13!") == {"man", "woman", "rock_music", "13"}
    assert tokenize("...") == set()


# --- is_correct -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, answer, choices, expected",
    [
        # exact, case and punctuation do not matter
        ("Man", "Man", GENDER, True),
        ("MAN.", "Man", GENDER, True),
        ("(man)", "Man", GENDER, True),
        # extra words are fine as long as they belong to no other choice
        ("The answer is Man", "Man", GENDER, True),
        ("It is a man, not a woman", "Man", GENDER, False),
        # "woman" contains "man" as a substring but not as a token
        ("Woman", "Man", GENDER, False),
        # empty or token-less predictions are wrong
        ("", "Man", GENDER, False),
        ("  ?! ", "Man", GENDER, False),
        (None, "Man", GENDER, False),
        # a bare option letter is just the token "a": no letter mapping
        ("A", "Man", GENDER, False),
        ("A", "A", ["A", "B", "C", "D"], True),
        ("B", "A", ["A", "B", "C", "D"], False),
        # words shared between choices: the shared word is allowed, all answer words needed
        ("male speaker", "Male speaker", ["Male speaker", "Female speaker"], True),
        ("Male", "Male speaker", ["Male speaker", "Female speaker"], False),
        ("speaker", "Male speaker", ["Male speaker", "Female speaker"], False),
        ("female speaker", "Female speaker", ["Male speaker", "Female speaker"], True),
        # the answer is a prefix of another choice
        ("Dog", "Dog", ["Dog", "Dog barking", "Cat"], True),
        ("dog barking", "Dog", ["Dog", "Dog barking", "Cat"], False),
        ("dog", "Dog barking", ["Dog", "Dog barking", "Cat"], False),
        # the answer's words inside a wrong choice are not held against it
        ("piano", "piano", ["guitar and piano", "piano", "drums"], True),
        # duplicate choices: a copy of the answer (same tokens) is ignored
        ("Man", "Man", ["Man", "Man", "Woman"], True),
        ("Man", "Man", ["man.", "Man", "Woman"], True),
        ("Woman", "Woman", ["Man", "Woman", "Man"], True),
        # numbers: "3" and "13" are different tokens
        ("3", "3", ["3", "13", "23"], True),
        ("13", "3", ["3", "13", "23"], False),
        ("3", "13", ["3", "13", "23"], False),
        ("3 or 13", "3", ["3", "13", "23"], False),
        ("There are 3 dogs", "3", ["3", "13", "23"], True),
        # a whole output kept because its tags span lines: tag words are tokens too
        (extract_answer("<answer>\nMan\n</answer>"), "Man", GENDER, True),
        (extract_answer("<answer>\nMan or Woman\n</answer>"), "Man", GENDER, False),
    ],
)
def test_is_correct(prediction, answer, choices, expected):
    assert is_correct(prediction, answer, choices) is expected


# --- score ------------------------------------------------------------------------------------


def _record(i, task, difficulty, sub, prediction, answer="Man", **extra):
    record = {
        "id": f"q{i}", "question": "Who speaks?", "choices": GENDER, "answer": answer,
        "task": task, "difficulty": difficulty, "sub-category": sub,
    }
    if prediction is not None:
        record["model_output"] = prediction
    record.update(extra)
    return record


def test_score_structure_and_grouping():
    items = [
        _record(0, "sound", "easy", "S1", "Man"),
        _record(1, "sound", "easy", "S1", "Woman"),
        _record(2, "sound", "hard", "S2", "Man"),
        _record(3, "music", "medium", "M1", "man"),
        _record(4, "speech", "hard", "P1", ""),
        _record(5, "speech", "hard", "P1", "Robot"),
    ]
    scores = score(items)
    assert list(scores) == ["total", "task", "difficulty", "sub-category"]
    assert scores["total"] == {"correct": 3, "count": 6, "accuracy": 50.0}
    assert list(scores["task"]) == ["sound", "music", "speech"]
    assert scores["task"]["sound"] == {"correct": 2, "count": 3, "accuracy": 66.67}
    assert scores["task"]["music"] == {"correct": 1, "count": 1, "accuracy": 100.0}
    assert scores["task"]["speech"] == {"correct": 0, "count": 2, "accuracy": 0.0}
    assert list(scores["difficulty"]) == ["easy", "medium", "hard"]
    assert scores["difficulty"]["hard"] == {"correct": 1, "count": 3, "accuracy": 33.33}
    assert scores["sub-category"]["S1"] == {"correct": 1, "count": 2, "accuracy": 50.0}
    assert json.loads(json.dumps(scores)) == scores  # plain JSON


def test_samples_without_prediction_are_left_out_and_reported(caplog):
    items = [
        _record(0, "sound", "easy", "S1", "Man"),
        _record(1, "sound", "easy", "S1", None),  # no prediction key at all
        _record(2, "music", "easy", "M1", None),
    ]
    with caplog.at_level(logging.WARNING, logger="data.scoring"):
        scores = score(items)
    assert scores["total"] == {"correct": 1, "count": 1, "accuracy": 100.0}
    assert "music" not in scores["task"]
    assert "2 of 3 samples have no prediction" in caplog.text and "q1" in caplog.text
    report = score_report(items)
    assert report.no_prediction == ["q1", "q2"]
    assert report.matches == [True, None, None]


def test_prediction_keys_official_first_then_r1aqa():
    official_wins = _record(0, "sound", "easy", "S1", "Man", model_prediction="Woman")
    assert score([official_wins])["total"]["correct"] == 1
    r1aqa_only = _record(1, "sound", "easy", "S1", None, model_prediction="Man")
    assert score([r1aqa_only])["total"]["correct"] == 1
    # an explicit key reads only that key
    assert score([official_wins], prediction_key="model_prediction")["total"]["correct"] == 0
    # a JSON null prediction is an empty prediction: counted, wrong
    null = _record(2, "sound", "easy", "S1", None, model_output=None)
    assert score([null])["total"] == {"correct": 0, "count": 1, "accuracy": 0.0}


def test_empty_input():
    scores = score([])
    assert scores == {"total": {"correct": 0, "count": 0, "accuracy": 0.0},
                      "task": {}, "difficulty": {}, "sub-category": {}}


def test_avqa_and_mmar_schemas():
    avqa = {"id": 1, "question_text": "What is in the audio?", "multi_choice": ["dog", "cat"],
            "answer": 1, "task": "animals", "model_output": "cat"}
    assert score([avqa])["total"]["correct"] == 1
    assert score([avqa])["task"] == {"animals": {"correct": 1, "count": 1, "accuracy": 100.0}}
    mmar = {"id": "m", "question": "?", "choices": ["a dog", "a cat"], "answer": "a cat",
            "modality": "sound-music", "category": "c", "sub-category": "s",
            "model_prediction": "A cat."}
    scores = score([mmar])
    assert scores["task"] == {"sound-music": {"correct": 1, "count": 1, "accuracy": 100.0}}
    assert scores["difficulty"] == {}


@pytest.mark.skipif(not (MMAU_DIR / "mmau-test-mini.2024-12.json").exists(),
                    reason=f"MMAU test-mini not found in {MMAU_DIR}")
def test_mmau_test_mini_answers_score_100_and_counts_match_the_benchmark():
    records = json.loads((MMAU_DIR / "mmau-test-mini.2024-12.json").read_text())
    for record in records:
        record["model_output"] = record["answer"]
    scores = score(records)
    assert scores["total"] == {"correct": 1000, "count": 1000, "accuracy": 100.0}
    assert {k: v["count"] for k, v in scores["task"].items()} == {
        "sound": 333, "music": 334, "speech": 333}
    assert sum(v["count"] for v in scores["sub-category"].values()) == 1000
