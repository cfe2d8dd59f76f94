import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data.audio import AudioError, AudioLoader, load_audio, resample

REPO = Path(__file__).resolve().parents[1]

# Rate pairs a dataset meets (CD, video, telephone, odd ratios with large reduced rates) and
# tiny coprime ones whose filters are short.
RATES = [(44100, 16000), (48000, 16000), (22050, 16000), (11025, 16000), (8000, 16000), (32000, 16000),
         (96000, 16000), (16000, 44100), (16000, 8000), (7, 3), (3, 7)]


def _torchaudio_resample():
    """torchaudio's resampler, or a skip where torchaudio is not installed or does not load
    with this torch (a build for another release fails at import with OSError, not ImportError)."""
    try:
        import torchaudio.functional as AF
    except Exception as e:
        pytest.skip(f"torchaudio does not import here ({type(e).__name__}); the parity test needs it")
    return AF.resample


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


def test_load_audio_resamples_to_the_requested_rate(tmp_path):
    x = _sine(1000, 1.0, 44100)
    sf.write(tmp_path / "a.flac", x, 44100)  # flac: decoded by soundfile's bundled libsndfile
    y = load_audio(tmp_path / "a.flac")
    assert y.dtype == np.float32 and y.shape == (16000,)
    assert abs(_peak_hz(y, 16000) - 1000) <= 1
    x_decoded = sf.read(tmp_path / "a.flac", dtype="float32")[0]
    np.testing.assert_array_equal(y, resample(x_decoded, 44100, 16000))
    assert load_audio(tmp_path / "a.flac", sampling_rate=8000).shape == (8000,)


@pytest.mark.parametrize("orig,new", RATES)
def test_resample_equals_torchaudio(orig, new):
    """The data path is R1-AQA's: torchaudio's default resampler. Ours computes in float64, so it
    equals torchaudio run on float64 to the last float32 bit, and torchaudio's float32 run to the
    rounding of its float32 filter (whose phases i/L - j/M lose bits when L and M are large)."""
    torchaudio_resample = _torchaudio_resample()
    rng = np.random.default_rng(orig * 7 + new)
    for n in (1, 2, 5, 99, 1000, 3 * orig + 1):
        x = np.clip(0.3 * rng.standard_normal(n), -1, 1).astype(np.float32)
        y = resample(x, orig, new)
        assert y.dtype == np.float32
        exact = torchaudio_resample(torch.from_numpy(x).double(), orig, new).float().numpy()
        np.testing.assert_allclose(y, exact, rtol=0, atol=1.2e-7)  # one float32 ulp at |y| < 1
        ta32 = torchaudio_resample(torch.from_numpy(x), orig, new).numpy()
        np.testing.assert_allclose(y, ta32, rtol=0, atol=1e-4)


@pytest.mark.parametrize("orig,new", RATES)
def test_resample_output_length(orig, new):
    for n in (0, 1, 2, 3, orig - 1, orig, orig + 1, 5 * orig + 3):
        assert resample(np.zeros(n, np.float32), orig, new).shape == (-(-n * new // orig),)  # ceil(n * new / orig)


@pytest.mark.parametrize("orig,new,freq", [(44100, 16000, 1000), (48000, 16000, 3000), (8000, 16000, 440),
                                           (22050, 16000, 5000), (16000, 44100, 5000), (11025, 16000, 2500)])
def test_resampled_sine_keeps_its_frequency_and_amplitude(orig, new, freq):
    y = resample(_sine(freq, 1.0, orig), orig, new)
    assert abs(_peak_hz(y, new) - freq) <= 1
    t = np.arange(len(y)) / new  # the same sine sampled at the new rate, compared away from the padded ends
    np.testing.assert_allclose(y[new // 10: -new // 10], 0.5 * np.sin(2 * np.pi * freq * t)[new // 10: -new // 10],
                               atol=0.01)


@pytest.mark.parametrize("orig,new,freq", [(44100, 16000, 12000), (48000, 16000, 10000), (48000, 16000, 12000),
                                           (96000, 16000, 20000)])
def test_tone_above_the_new_nyquist_is_filtered_out(orig, new, freq):
    """A tone above the new Nyquist (8 kHz) cannot be represented: without the low-pass it would
    fold back to |freq - new| Hz at full amplitude. The filter's transition band ends a little
    above the cutoff, so tones from 1.25 x Nyquist on must come out 40 dB down or more."""
    y = resample(_sine(freq, 1.0, orig), orig, new)
    tone_rms = 0.5 / np.sqrt(2)
    assert np.sqrt(np.mean(y[new // 10: -new // 10] ** 2)) < 0.01 * tone_rms
    if orig % new == 0:  # the control: plain decimation keeps the tone, folded
        naive = _sine(freq, 1.0, orig)[:: orig // new]
        assert np.sqrt(np.mean(naive ** 2)) > 0.9 * tone_rms
        assert abs(_peak_hz(naive, new) - abs(freq - new * round(freq / new))) <= 1


def test_resample_rejects_bad_rates():
    for orig, new in [(0, 16000), (44100, -1), (44100.5, 16000)]:
        with pytest.raises(ValueError, match="positive integers"):
            resample(np.zeros(10, np.float32), orig, new)
    x = _sine(440, 0.1, 16000)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)


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


def test_the_project_and_the_feature_extractor_run_without_torchaudio(tmp_path):
    """torchaudio is a test-only dependency: with its import made to fail, every project module
    imports, a 44.1 kHz clip loads at 16 kHz and the Whisper feature extractor (Qwen2-Audio's)
    turns it into log-mel features."""
    sf.write(tmp_path / "a.wav", _sine(440, 1.0, 44100), 44100)
    code = f"""
import sys, importlib, pkgutil
sys.modules["torchaudio"] = None  # any `import torchaudio` now raises ImportError
import numpy as np
for package in ("data", "models", "grpo", "evaluation"):
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{{package}}.{{info.name}}")
import train, evaluate
from data.audio import load_audio
from transformers import WhisperFeatureExtractor
wav = load_audio({str(tmp_path / "a.wav")!r})
features = WhisperFeatureExtractor()(wav, sampling_rate=16000, return_tensors="pt").input_features
assert wav.shape == (16000,) and features.shape == (1, 80, 3000), (wav.shape, features.shape)
assert "torchaudio" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
