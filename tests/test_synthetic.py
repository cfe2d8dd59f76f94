import collections
import json

import numpy as np
import pytest
import soundfile as sf

from data.audio import load_audio
from data.datasets import read_dataset
from data.synthetic import SYNTHETIC_TASKS, generate_synthetic, main, make_clip, synthetic_corpus

SR = 16000
WORDS = ["one", "two", "three", "four", "five"]


# ---- an independent listener: recovers each answer from the waveform alone (no params)

def _stft(x, win=1024, hop=160):
    n = 1 + (len(x) - win) // hop
    frames = np.stack([x[i * hop:i * hop + win] for i in range(n)]) * np.hanning(win)
    return np.abs(np.fft.rfft(frames, axis=1))  # [frames, bins]


def _tone_envelope(x):
    """Magnitude over time at the clip's dominant frequency: ignores broadband noise."""
    S = _stft(x, 512)
    k = S.sum(0).argmax()
    return S[:, max(k - 2, 0):k + 3].max(1)


def _runs(on):
    edges = np.diff(np.r_[0, on.astype(int), 0])
    return list(zip(np.where(edges == 1)[0], np.where(edges == -1)[0]))


def listen(task, x):
    if task == "pitch":
        f = np.fft.rfftfreq(1024, 1 / SR)[_stft(x).sum(0).argmax()]
        return "high" if f > 500 else "low"
    if task == "count":
        e = _tone_envelope(x)
        return WORDS[len(_runs(e > 0.25 * e.max())) - 1]
    if task == "loudness":
        e = _tone_envelope(x)
        r = _runs(e > 0.1 * e.max())
        assert len(r) == 2
        first, second = (e[a:b].max() for a, b in r)
        return "first" if first > second else "second"
    if task == "sweep":
        S = _stft(x, 2048)
        peak = S.max(1)
        keep = peak > 0.5 * peak.max()
        slope = np.polyfit(np.arange(len(S))[keep], S.argmax(1)[keep], 1)[0]
        return "rising" if slope > 0 else "falling"
    if task == "tone_or_noise":
        p = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
        k = p.argmax()
        return "tone" if p[max(k - 8, 0):k + 9].sum() / p.sum() > 0.3 else "noise"
    raise AssertionError(task)


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_answers_are_audible(difficulty):
    for task in SYNTHETIC_TASKS:
        answers = []
        for i in range(12):
            wav, question, choices, answer, diff, _ = make_clip(3, "train", i, task, difficulty)
            assert wav.dtype == np.float32 and wav.shape == (2 * SR,) and np.abs(wav).max() <= 0.9
            assert diff == difficulty and answer in choices and len(set(choices)) == len(choices)
            assert listen(task, wav) == answer, (task, i)
            answers.append(answer)
        assert len(set(answers)) > 1, task  # not a constant answer


def test_generate_writes_readable_avqa_set(tmp_path):
    jsonl = generate_synthetic(tmp_path, n=20, seed=1, difficulty="mixed", progress=False)
    assert jsonl == tmp_path / "train.jsonl"
    assert not list(tmp_path.rglob("*.tmp"))  # temp files renamed away
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(recs) == 20
    for r in recs:
        assert r["dataset_name"] == "synthetic" and r["question_type"] == r["task"]
        assert not r["audio_path"].startswith("/") and 2 <= len(r["multi_choice"]) <= 5
        assert set(r) >= {"id", "video_name", "video_id", "question_text", "multi_choice", "answer",
                          "question_relation", "question_type", "dataset_name", "audio_path", "task", "difficulty"}
    assert collections.Counter(r["task"] for r in recs) == {t: 4 for t in SYNTHETIC_TASKS}
    assert len({r["difficulty"] for r in recs}) > 1
    assert len({r["answer"] for r in recs}) > 1  # the answer's position varies
    samples = read_dataset("synthetic", jsonl)
    for s, r in zip(samples, recs):
        assert s.answer == r["multi_choice"][r["answer"]] and s.task == r["task"]
        info = sf.info(s.audio_path)
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, 2 * SR)
        if s.id == recs[0]["id"]:
            assert listen(s.task, load_audio(s.audio_path)) == s.answer  # survives PCM16 round trip


def test_deterministic_and_prefix_stable(tmp_path):
    a = generate_synthetic(tmp_path / "a", n=6, seed=7, difficulty="hard", progress=False)
    b = generate_synthetic(tmp_path / "b", n=6, seed=7, difficulty="hard", progress=False)
    c = generate_synthetic(tmp_path / "c", n=3, seed=7, difficulty="hard", progress=False)
    d = generate_synthetic(tmp_path / "d", n=3, seed=8, difficulty="hard", progress=False)
    v = generate_synthetic(tmp_path / "a", n=3, seed=7, difficulty="hard", split="val", progress=False)
    assert a.read_text() == b.read_text()
    assert a.read_text().splitlines()[:3] == c.read_text().splitlines()
    assert a.read_text().splitlines()[:3] != d.read_text().splitlines()
    for i in range(6):
        name = f"audio/train/syn-train-{i:06d}.wav"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # another split is other clips, beside the first
    assert (tmp_path / "a" / "train.jsonl").exists() and v.name == "val.jsonl"
    assert not np.array_equal(sf.read(tmp_path / "a/audio/val/syn-val-000000.wav")[0],
                              sf.read(tmp_path / "a/audio/train/syn-train-000000.wav")[0])


def test_count_choices_by_difficulty_and_task_subset(tmp_path):
    for difficulty, k in [("easy", 2), ("medium", 3), ("hard", 5)]:
        jsonl = generate_synthetic(tmp_path / difficulty, n=4, seed=0, tasks=["count"],
                                   difficulty=difficulty, clip_seconds=3.0, progress=False)
        for r in map(json.loads, jsonl.read_text().splitlines()):
            assert len(r["multi_choice"]) == k and set(r["multi_choice"]) <= set(WORDS)
            assert sf.info(tmp_path / difficulty / r["audio_path"]).frames == 3 * SR
    with pytest.raises(ValueError, match="unknown synthetic tasks"):
        generate_synthetic(tmp_path, n=1, seed=0, tasks=["speech"])
    with pytest.raises(ValueError, match="difficulty"):
        generate_synthetic(tmp_path, n=1, seed=0, difficulty="extreme")


def test_corpus_covers_questions_and_answers(tmp_path):
    corpus = synthetic_corpus()
    text = "\n".join(corpus)
    jsonl = generate_synthetic(tmp_path, n=15, seed=2, difficulty="hard", progress=False)
    for r in map(json.loads, jsonl.read_text().splitlines()):
        assert r["question_text"] in corpus and all(c in corpus for c in r["multi_choice"])
    for piece in ["Please choose the answer from the following options:", "<answer>", "</think>",
                  "Output the final answer in <answer> </answer>."]:
        assert piece in text


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--n", "5", "--seed", "3", "--split", "val", "--tasks", "pitch,sweep"])
    out = capsys.readouterr().out.strip()
    assert out.endswith("val.jsonl")
    recs = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [r["task"] for r in recs] == ["pitch", "sweep", "pitch", "sweep", "pitch"]
