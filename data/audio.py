"""Audio I/O: decode with soundfile, pick one channel, resample to 16 kHz, float32 numpy.

soundfile (libsndfile, bundled in the wheel) decodes wav/flac/ogg/mp3 without FFmpeg;
torchaudio.load would need TorchCodec + FFmpeg, so it is never used here.
"""

import logging
import os

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

logger = logging.getLogger(__name__)

CHANNELS = ("first", "mean")


class AudioError(RuntimeError):
    """A clip that cannot be used: missing, empty, undecodable or not finite. The message names the file."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_audio(path, *, sampling_rate=16000, channel="first"):
    """Decode `path` -> np.ndarray [S] float32 mono at `sampling_rate`.

    channel="first" keeps channel 0 (what R1-AQA does: waveform[0]); "mean" averages channels.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(path, "audio file not found")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # [S, C]
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError on junk
        raise AudioError(path, f"cannot decode audio ({type(e).__name__}: {e})") from e
    if wav.shape[0] == 0 or wav.shape[1] == 0:
        raise AudioError(path, "audio file has no samples")
    bad = int(np.count_nonzero(~np.isfinite(wav)))
    if bad:  # float wav files can hold NaN/Inf; one such sample makes every loss NaN
        raise AudioError(path, f"{bad} of {wav.size} audio samples are NaN or Inf")
    wav = wav[:, 0] if channel == "first" else wav.mean(axis=1)  # [S]
    if sr != sampling_rate:
        # torchaudio's windowed-sinc resampler, the same one R1-AQA's Resample transform uses
        wav = AF.resample(torch.from_numpy(np.ascontiguousarray(wav)), sr, sampling_rate).numpy()
    return np.ascontiguousarray(wav, dtype=np.float32)


class AudioLoader:
    """Callable `loader(path) -> np.ndarray [S] float32`, cutting clips to `max_seconds`.

    The model's feature extractor silently drops audio beyond its window; cutting here makes
    that visible: one warning the first time, then a count in `n_cut` (and `n_loaded`).
    """

    def __init__(self, sampling_rate=16000, max_seconds=None, channel="first"):
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self.sampling_rate = sampling_rate
        self.max_seconds = max_seconds
        self.channel = channel
        self.max_samples = None if max_seconds is None else int(round(max_seconds * sampling_rate))
        self.n_loaded = 0
        self.n_cut = 0

    def __call__(self, path):
        wav = load_audio(path, sampling_rate=self.sampling_rate, channel=self.channel)
        self.n_loaded += 1
        if self.max_samples is not None and wav.shape[0] > self.max_samples:
            if self.n_cut == 0:
                logger.warning(
                    "%s: %.2f s clip cut to %.2f s (the model's audio window); "
                    "further cuts are only counted (AudioLoader.n_cut)",
                    os.fspath(path), wav.shape[0] / self.sampling_rate, self.max_seconds)
            self.n_cut += 1
            wav = wav[: self.max_samples]
        return wav
