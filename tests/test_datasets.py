import collections
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data.audio import AudioError, AudioLoader
from data.datasets import DataError, Sample, read_avqa, read_dataset, read_mmar, read_mmau, video_to_audio

MMAU_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmau"
MMAU_FILES = ["mmau-test-mini.2024-12.json", "mmau-test-mini.v05.15.25.json"]


def _avqa_rec(i=0, **kw):
    rec = {"id": 100 + i, "video_name": f"abc_{i:06d}", "video_id": i,
           "question_text": "What is making the sound in the video?",
           "multi_choice": ["dog", "cat", "car", "bird"], "answer": 2,
           "question_relation": "View", "question_type": "Which", "dataset_name": "AVQA",
           "audio_path": f"wavs/abc_{i}.wav"}
    rec.update(kw)
    return rec


def _write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


# ---------------------------------------------------------------- AVQA


def test_avqa_fields_paths_and_video_to_audio(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [
        _avqa_rec(0),
        _avqa_rec(1, task="counting", question_text="Video: which videos show it?"),
        _avqa_rec(2, audio_path="/abs/clip.wav"),
    ])
    s = read_avqa(f)
    assert [x.id for x in s] == ["100", "101", "102"]
    assert s[0].audio_path == str(tmp_path / "wavs" / "abc_0.wav")  # relative to the JSONL's folder
    assert s[2].audio_path == "/abs/clip.wav"
    assert s[0].question == "What is making the sound in the audio?"
    assert s[1].question == "Audio: which audios show it?"
    assert s[0].choices == ["dog", "cat", "car", "bird"] and s[0].answer == "car"
    assert (s[0].task, s[1].task) == ("Which", "counting")  # question_type unless a task is given
    assert s[0].meta == _avqa_rec(0)  # the source record, untouched (question still says video)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s[0].answer = "dog"
    root = tmp_path / "elsewhere"
    assert read_avqa(f, audio_root=root)[0].audio_path == str(root / "wavs" / "abc_0.wav")
    assert read_dataset("synthetic", f)[1].answer == "car"


def test_video_to_audio_is_word_wise():
    assert video_to_audio("In the video, the Video and videos") == "In the audio, the Audio and audios"
    assert video_to_audio("a musicvideo clip") == "a musicvideo clip"


BAD_AVQA = [
    ("{not json", "malformed JSON"),
    (_avqa_rec(answer=4), "out of range"),
    (_avqa_rec(answer=-1), "out of range"),
    (_avqa_rec(answer="1"), "must be an int"),
    (_avqa_rec(answer=True), "must be an int"),
    (_avqa_rec(answer=1.0), "must be an int"),
    (_avqa_rec(multi_choice="dog,cat"), "list of strings"),
    (_avqa_rec(multi_choice=["dog", 3]), "list of strings"),
    (_avqa_rec(multi_choice=[]), "list of strings"),
    ({k: v for k, v in _avqa_rec().items() if k != "question_text"}, "missing field 'question_text'"),
    ({k: v for k, v in _avqa_rec().items() if k != "audio_path"}, "missing field 'audio_path'"),
    ([1, 2], "not an object"),
]


@pytest.mark.parametrize("bad,why", BAD_AVQA)
def test_avqa_bad_record_names_file_and_line(tmp_path, bad, why):
    bad = bad if isinstance(bad, str) else json.dumps(bad)
    f = _write_jsonl(tmp_path / "d.jsonl", [_avqa_rec(0), "", _avqa_rec(1), bad])
    with pytest.raises(DataError, match=why) as e:
        read_avqa(f)
    assert f"{f}: line 4:" in str(e.value)  # blank line 2 still counts


def test_avqa_skip_keeps_good_records_and_logs_count(tmp_path, caplog):
    lines = [_avqa_rec(0)] + [b if isinstance(b, str) else json.dumps(b) for b, _ in BAD_AVQA] + [_avqa_rec(1)]
    f = _write_jsonl(tmp_path / "d.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        s = read_avqa(f, on_error="skip")
    assert [x.id for x in s] == ["100", "101"]
    msg = "\n".join(r.getMessage() for r in caplog.records)
    assert f"skipped {len(BAD_AVQA)} of {len(BAD_AVQA) + 2} records" in msg and f"{f}: line 2:" in msg
    with pytest.raises(ValueError):
        read_avqa(f, on_error="ignore")


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_avqa(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        read_avqa(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="unknown dataset format"):
        read_dataset("clotho", tmp_path / "empty.jsonl")


# ---------------------------------------------------------------- MMAU


def _mmau_rec(i, **kw):
    rec = {"id": f"id{i}", "audio_id": f"./test-mini-audios/id{i}.wav", "question": "What is it?",
           "choices": ["Man", "Woman"], "answer": "Man", "dataset": "x", "task": "sound",
           "split": "test-mini", "category": "c", "sub-category": "s", "difficulty": "easy"}
    rec.update(kw)
    return rec


@pytest.mark.parametrize("name", MMAU_FILES)
def test_real_mmau_test_mini(tmp_path, name, caplog):
    src = MMAU_DIR / name
    if not src.exists():
        pytest.skip(f"{src} not present (shared data beside the repo)")
    raw = json.loads(src.read_text())
    root = tmp_path / "mmau"
    s = read_mmau(src, audio_root=root)
    assert len(s) == len(raw) == 1000
    assert collections.Counter(x.task for x in s) == {"sound": 333, "music": 334, "speech": 333}
    # every answer is among its choices in both versions (checked by the reader, re-checked here)
    assert all(x.answer is not None and x.answer in x.choices for x in s)
    assert all(x.meta == r and x.id == r["id"] for x, r in zip(s, raw))
    assert s[0].audio_path == str(root / "test-mini-audios" / f"{raw[0]['id']}.wav")
    # default root: the JSON's own folder
    assert read_mmau(src)[0].audio_path == str(MMAU_DIR / "test-mini-audios" / f"{raw[0]['id']}.wav")

    # placeholder audio for a few records: readers do not open audio, the loader does
    (root / "test-mini-audios").mkdir(parents=True)
    for x in s[:3]:
        sf.write(x.audio_path, np.zeros(8000, np.float32), 16000)
    loader = AudioLoader()
    assert all(loader(x.audio_path).shape == (8000,) for x in s[:3])
    with pytest.raises(AudioError, match=s[3].id):
        loader(s[3].audio_path)
    # check_audio reports every missing clip at once, or drops them with a count
    with pytest.raises(DataError, match="997 of 1000 audio files not found"):
        read_mmau(src, audio_root=root, check_audio=True)
    with caplog.at_level(logging.WARNING, logger="data.datasets"):
        kept = read_mmau(src, audio_root=root, check_audio=True, on_error="skip")
    assert [x.id for x in kept] == [x.id for x in s[:3]]
    assert "skipped 997 of 1000" in caplog.text


def test_mmau_without_answers_and_bad_answers(tmp_path, caplog):
    recs = [_mmau_rec(0), {k: v for k, v in _mmau_rec(1).items() if k != "answer"}, _mmau_rec(2, answer="Child")]
    f = tmp_path / "mmau.json"
    f.write_text(json.dumps(recs, indent=2))
    with pytest.raises(DataError, match=r"item 2: answer 'Child' is not among choices") as e:
        read_mmau(f, audio_root=tmp_path)
    assert str(f) in str(e.value)
    s = read_mmau(f, audio_root=tmp_path, on_error="skip")
    assert [x.answer for x in s] == ["Man", None]  # MMAU test has no answers: None, kept
    for bad, why in [(_mmau_rec(0, choices="Man"), "list of strings"), (_mmau_rec(0, answer=1), "must be a string"),
                     ({k: v for k, v in _mmau_rec(0).items() if k != "audio_id"}, "missing field 'audio_id'")]:
        f.write_text(json.dumps([_mmau_rec(1), bad]))
        with pytest.raises(DataError, match=f"item 1: .*{why}"):
            read_mmau(f, audio_root=tmp_path)
    f.write_text('[{"id": "a",\n "choices": [}]')
    with pytest.raises(DataError, match=rf"{f}: line 2: malformed JSON"):
        read_mmau(f, audio_root=tmp_path)


# ---------------------------------------------------------------- MMAR


def _mmar_rec(i, **kw):
    rec = {"id": f"m{i}", "audio_path": f"./audio/m{i}.wav", "question": "Which?", "choices": ["A", "B", "C"],
           "answer": "B", "modality": "sound-music", "category": "Perception", "sub-category": "x",
           "language": "en"}
    rec.update(kw)
    return rec


def test_mmar_jsonl_and_json_list(tmp_path):
    f = _write_jsonl(tmp_path / "mmar.jsonl", [_mmar_rec(0), _mmar_rec(1, answer="C")])
    s = read_mmar(f, audio_root=tmp_path / "root")
    assert [(x.id, x.answer, x.task) for x in s] == [("m0", "B", "sound-music"), ("m1", "C", "sound-music")]
    assert s[0].audio_path == str(tmp_path / "root" / "audio" / "m0.wav")
    g = tmp_path / "MMAR-meta.json"  # the official release is a JSON list
    g.write_text(json.dumps([_mmar_rec(0), _mmar_rec(1)]))
    assert read_dataset("mmar", g)[1].audio_path == str(tmp_path / "audio" / "m1.wav")
    _write_jsonl(f, [_mmar_rec(0), _mmar_rec(1, answer="D")])
    with pytest.raises(DataError, match=rf"{f}: line 2: answer 'D' is not among"):
        read_mmar(f, audio_root=tmp_path)


def test_sample_fields_match_contract():
    names = [f.name for f in dataclasses.fields(Sample)]
    assert names == ["id", "audio_path", "question", "choices", "answer", "task", "meta", "source"]
