import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf

from data.datasets import read_avqa
from scripts.prepare_avqa import PrepareError, convert, main, wav_name


def _q(i, video_name, answer=1):
    return {"id": i, "video_name": video_name, "video_id": 1000 + i,
            "question_text": "What is the main sound source in the video?",
            "multi_choice": ["dog", "cat", "car", "train"], "answer": answer,
            "question_relation": "Both", "question_type": "Which"}


@pytest.mark.parametrize("video,wav", [
    ("-HG3Omg_89c_000030", "-HG3Omg_89c_30.wav"),
    ("abc_def-12_000000", "abc_def-12_0.wav"),  # id with '_' and '-'; 000000 -> 0
    ("___-_-_001200", "___-_-_1200.wav"),
    ("x_000007", "x_7.wav"),
    ("A1b2C3d4E5f_123456", "A1b2C3d4E5f_123456.wav"),
])
def test_wav_name(video, wav):
    assert wav_name(video) == wav


@pytest.mark.parametrize("bad", ["-HG3Omg_89c", "-HG3Omg_89c_30", "-HG3Omg_89c_0000300", "_000030x", 30, None])
def test_wav_name_rejects_malformed(bad):
    with pytest.raises(ValueError):
        wav_name(bad)


@pytest.fixture
def raw(tmp_path):
    audio = tmp_path / "wavs"
    audio.mkdir()
    for name in ["-HG3Omg_89c_30.wav", "abc_def-12_0.wav", "zz_1200.wav"]:
        sf.write(audio / name, np.zeros(1600, np.float32), 16000)
    qs = [_q(0, "-HG3Omg_89c_000030"), _q(1, "missing_clip_000010"), _q(2, "abc_def-12_000000", answer=3),
          _q(3, "zz_001200"), _q(4, "gone_000000"), _q(5, "-HG3Omg_89c_000030", answer=0)]
    qa = tmp_path / "train_qa.json"
    qa.write_text(json.dumps(qs))
    return qa, audio, qs


def test_convert_writes_only_questions_with_audio(raw, tmp_path, caplog):
    qa, audio, qs = raw
    out = tmp_path / "out" / "avqa.jsonl"
    with caplog.at_level(logging.WARNING, logger="prepare_avqa"):
        n, missing = convert(qa, audio, out, progress=False)
    assert n == 4 and missing == [("missing_clip_000010", "missing_clip_10.wav"), ("gone_000000", "gone_0.wav")]
    assert "2 of 6 questions have no audio" in caplog.text
    assert "missing_clip_000010 -> missing_clip_10.wav" in caplog.text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [0, 2, 3, 5]
    for r in recs:
        src = qs[r["id"]]
        assert {k: v for k, v in r.items() if k not in ("dataset_name", "audio_path")} == src
        assert r["dataset_name"] == "AVQA" and os.path.isabs(r["audio_path"]) and os.path.exists(r["audio_path"])
    assert recs[1]["audio_path"] == str(audio / "abc_def-12_0.wav")
    assert not list(out.parent.glob("*.tmp"))
    samples = read_avqa(out)
    assert [s.answer for s in samples] == ["cat", "train", "cat", "dog"]
    assert samples[0].question == "What is the main sound source in the audio?"


def test_relative_paths_resolve_through_reader(raw, tmp_path):
    qa, audio, _ = raw
    out = tmp_path / "sub" / "avqa.jsonl"
    convert(qa, audio, out, relative_paths=True, progress=False)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["audio_path"] == "../wavs/-HG3Omg_89c_30.wav"
    assert read_avqa(out)[0].audio_path == str(audio / "-HG3Omg_89c_30.wav")


def test_bad_input_names_the_file(raw, tmp_path):
    qa, audio, qs = raw
    out = tmp_path / "o.jsonl"
    for bad, why in [({**qs[0], "answer": 4}, "answer 4"), ({**qs[0], "video_name": "nope"}, "video_name"),
                     ({k: v for k, v in qs[0].items() if k != "multi_choice"}, "missing fields")]:
        qa.write_text(json.dumps([qs[0], bad]))
        with pytest.raises(PrepareError, match=f"item 1: .*{why}") as e:
            convert(qa, audio, out, progress=False)
        assert str(qa) in str(e.value)
    qa.write_text("[{")
    with pytest.raises(PrepareError, match="malformed JSON"):
        convert(qa, audio, out, progress=False)
    qa.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(PrepareError, match="JSON list"):
        convert(qa, audio, out, progress=False)
    qa.write_text(json.dumps([_q(0, "nowhere_000001")]))
    with pytest.raises(PrepareError, match="none of 1 questions has audio"):
        convert(qa, audio, out, progress=False)
    with pytest.raises(PrepareError, match="audio directory not found"):
        convert(qa, tmp_path / "nodir", out, progress=False)
    assert not out.exists()  # nothing half-done


def test_cli(raw, tmp_path, capsys):
    qa, audio, _ = raw
    out = tmp_path / "cli.jsonl"
    main(["--qa", str(qa), "--audio-dir", str(audio), "--output", str(out), "--relative-paths"])
    assert "wrote 4 questions" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 4
    with pytest.raises(SystemExit, match="file not found"):
        main(["--qa", str(tmp_path / "none.json"), "--audio-dir", str(audio), "--output", str(out)])


def test_a_clip_not_at_16k_mono_is_converted_and_the_line_points_at_the_copy(raw, tmp_path, caplog):
    qa, audio, _ = raw
    t = np.arange(44100, dtype=np.float32) / 44100  # 1 s: a 440 Hz tone left, silence right
    sf.write(audio / "zz_1200.wav", np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1), 44100)
    out = tmp_path / "out" / "avqa.jsonl"
    with caplog.at_level(logging.WARNING, logger="prepare_avqa"):
        convert(qa, audio, out, progress=False)
    assert "1 clips were not 16 kHz mono (e.g. zz_1200.wav: 44100 Hz, 2 channel(s))" in caplog.text
    paths = {r["id"]: r["audio_path"] for r in map(json.loads, out.read_text().splitlines())}
    assert paths[3] == str(tmp_path / "out" / "avqa.jsonl.16k" / "zz_1200.wav")
    assert paths[0] == str(audio / "-HG3Omg_89c_30.wav")  # already 16 kHz mono: used where it is
    info = sf.info(paths[3])
    assert (info.samplerate, info.channels, info.frames) == (16000, 1, 16000)
    wave, _ = sf.read(paths[3], dtype="float32")
    assert 0.6 < np.abs(wave).max() <= 1.0  # the tone of the first channel, not the silent second


def test_an_undecodable_clip_is_named(raw, tmp_path):
    qa, audio, _ = raw
    (audio / "zz_1200.wav").write_bytes(b"not a wav")
    with pytest.raises(PrepareError, match="zz_1200.wav: cannot decode audio"):
        convert(qa, audio, tmp_path / "o.jsonl", progress=False)
