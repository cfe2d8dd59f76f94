import logging

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from data.audio import AudioError, AudioLoader, load_audio


def _sine(freq, seconds, sr):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, sr):
    return np.fft.rfftfreq(len(x), 1 / sr)[np.abs(np.fft.rfft(x)).argmax()]


def test_mono_16k_is_returned_as_is(tmp_path):
    x = _sine(440, 1.0, 16000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == (16000,)
    np.testing.assert_array_equal(y, x)


def test_first_channel_and_mean(tmp_path):
    left, right = _sine(440, 0.5, 16000), _sine(1000, 0.5, 16000) * 0.5
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "st.wav"), left)
    np.testing.assert_allclose(load_audio(tmp_path / "st.wav", channel="mean"), (left + right) / 2, atol=1e-7)
    with pytest.raises(ValueError):
        load_audio(tmp_path / "st.wav", channel="left")


def test_resamples_with_torchaudio(tmp_path):
    x = _sine(1000, 1.0, 44100)
    sf.write(tmp_path / "a.flac", x, 44100)  # flac: decoded by soundfile's bundled libsndfile
    y = load_audio(tmp_path / "a.flac")
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert abs(_peak_hz(y, 16000) - 1000) <= 1
    x16 = sf.read(tmp_path / "a.flac", dtype="float32")[0]
    np.testing.assert_allclose(y, AF.resample(torch.from_numpy(x16), 44100, 16000).numpy(), atol=1e-6)
    assert load_audio(tmp_path / "a.flac", sampling_rate=8000).shape == (8000,)


def test_bad_files_raise_audio_error_naming_the_file(tmp_path):
    missing = tmp_path / "nope.wav"
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0,), np.float32), 16000)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    for path, why in [(missing, "not found"), (empty, "no samples"), (junk, "cannot decode")]:
        with pytest.raises(AudioError, match=why) as e:
            load_audio(path)
        assert str(path) in str(e.value) and e.value.path == str(path)
        assert isinstance(e.value, RuntimeError)


def test_loader_cuts_long_clips_warns_once_and_counts(tmp_path, caplog):
    sf.write(tmp_path / "long1.wav", _sine(440, 5.0, 16000), 16000)
    sf.write(tmp_path / "long2.wav", _sine(440, 4.0, 16000), 16000)
    sf.write(tmp_path / "short.wav", _sine(440, 1.0, 16000), 16000)
    loader = AudioLoader(max_seconds=3.0)
    with caplog.at_level(logging.WARNING, logger="data.audio"):
        lengths = [len(loader(tmp_path / f)) for f in ("long1.wav", "short.wav", "long2.wav")]
    assert lengths == [48000, 16000, 48000]
    assert (loader.n_loaded, loader.n_cut) == (3, 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "long1.wav" in warnings[0].getMessage()


def test_loader_without_limit_keeps_everything(tmp_path):
    sf.write(tmp_path / "long.wav", _sine(440, 5.0, 8000), 8000)
    loader = AudioLoader()
    assert len(loader(tmp_path / "long.wav")) == 80000  # resampled 8k -> 16k, uncut
    assert loader.n_cut == 0
    with pytest.raises(AudioError):
        loader(tmp_path / "missing.wav")
    assert loader.n_loaded == 1
