"""Audio I/O: decode with soundfile, pick one channel, resample to 16 kHz, float32 numpy.

soundfile (libsndfile, bundled in the wheel) decodes wav/flac/ogg/mp3 without FFmpeg. The
resampler is written here (`resample`) rather than taken from torchaudio: it is the same
windowed-sinc filter R1-AQA's data path applies (torchaudio's default), and without torchaudio
the project installs beside any torch release, not only the one a torchaudio build matches.
"""

import logging
import math
import os

import numpy as np
import soundfile as sf
import torch

logger = logging.getLogger(__name__)

CHANNELS = ("first", "mean")


class AudioError(RuntimeError):
    """A clip that cannot be used: missing, empty, undecodable or not finite. The message names the file."""

    def __init__(self, path, reason, *, sample=None):
        self.path = str(path)
        self.reason = reason
        self.sample = sample  # "<file>: line <n>: sample <id>" when the clip belongs to a dataset record
        super().__init__(f"{sample}: {self.path}: {reason}" if sample else f"{self.path}: {reason}")


def resample(wav, orig_freq, new_freq, *, lowpass_filter_width=6, rolloff=0.99):
    """Band-limited resampling of `wav` [S] from `orig_freq` to `new_freq` Hz -> np.ndarray [S'] float32.

    Windowed-sinc interpolation with a Hann window, as torchaudio's `functional.resample` does
    with its defaults (lowpass_filter_width=6, rolloff=0.99, "sinc_interp_hann"), so that audio
    reaches the model as it does in R1-AQA. With the rates divided by their gcd (L = orig/gcd,
    M = new/gcd), the low-pass cutoff c = rolloff * min(L, M) in those units and w the filter
    width in zero crossings, output sample j is

        y[j] = sum_i x[i] * (c / L) * sinc(u) * cos(pi * u / (2w))^2,   u = c * (i/L - j/M)

    with sinc(u) = sin(pi u) / (pi u), u clamped to [-w, w] (the window ends there) and x zero
    outside the clip. The cutoff at the lower of the two Nyquist rates is the anti-aliasing
    filter when downsampling. The weights repeat every M outputs (shifted by L inputs), so they
    form M filters of 2W + L taps applied with stride L. The output has ceil(S * M / L) samples.
    Computed in float64, returned as float32.
    """
    if orig_freq != int(orig_freq) or new_freq != int(new_freq) or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"sampling rates must be positive integers, got {orig_freq} and {new_freq}")
    wav = np.asarray(wav, dtype=np.float32)
    if orig_freq == new_freq:
        return wav
    L, M, W = _filter_shape(orig_freq, new_freq, lowpass_filter_width, rolloff)
    w = lowpass_filter_width
    cutoff = rolloff * min(L, M)
    offsets = torch.arange(-W, W + L, dtype=torch.float64)  # input index within the frame [2W+L]
    phases = torch.arange(M, dtype=torch.float64)  # output index within the frame [M]
    u = (cutoff * (offsets[None, :] / L - phases[:, None] / M)).clamp(-w, w)  # [M, 2W+L]
    taps = (cutoff / L) * torch.sinc(u) * torch.cos(math.pi * u / (2 * w)) ** 2  # [M, 2W+L]
    x = torch.nn.functional.pad(torch.from_numpy(wav).to(torch.float64)[None, None], (W, W + L))  # [1, 1, S+2W+L]
    y = torch.nn.functional.conv1d(x, taps[:, None, :], stride=L)  # [1, M, S//L + 1]: y[0, m, k] = out[k*M + m]
    n_out = -(-wav.shape[0] * M // L)  # ceil(S * M / L)
    return y[0].T.reshape(-1)[:n_out].to(torch.float32).numpy()


def _filter_shape(orig_freq, new_freq, lowpass_filter_width=6, rolloff=0.99):
    """(L, M, W) of ``resample``: the rates over their gcd, and the input samples each side of a
    stride's L that reach its outputs."""
    g = math.gcd(int(orig_freq), int(new_freq))
    L, M = int(orig_freq) // g, int(new_freq) // g
    W = math.ceil(lowpass_filter_width * L / (rolloff * min(L, M)))
    return L, M, W


def input_frames(n_out, orig_freq, new_freq):
    """Input samples at ``orig_freq`` that the first ``n_out`` output samples of ``resample`` to
    ``new_freq`` depend on: output j = k*M + m is a filter over inputs k*L - W .. k*L + W + L - 1."""
    if n_out <= 0:
        return 0
    if orig_freq == new_freq:
        return n_out
    L, M, W = _filter_shape(orig_freq, new_freq)
    return (n_out - 1) // M * L + W + L


def read_clip(path, *, sampling_rate=16000, channel="first", max_samples=None):
    """Decode `path` -> (np.ndarray [S] float32 mono at `sampling_rate`, the clip's whole length
    in samples at `sampling_rate`).

    With ``max_samples`` only the start of the file that those samples need is read and decoded
    (``input_frames``), so a clip's cost is set by the window, not by the length its header
    states; the result is at most ``max_samples`` long. channel="first" keeps channel 0 (what
    R1-AQA does: waveform[0]); "mean" averages channels.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(path, "audio file not found")
    try:
        with sf.SoundFile(path) as f:
            sr, frames = f.samplerate, f.frames
            wanted = -1 if max_samples is None else min(frames, input_frames(max_samples, sr, sampling_rate))
            wav = f.read(wanted, dtype="float32", always_2d=True)  # [S, C]
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError on junk
        raise AudioError(path, f"cannot decode audio ({type(e).__name__}: {e})") from e
    if wav.shape[0] == 0 or wav.shape[1] == 0:
        raise AudioError(path, "audio file has no samples")
    whole = -(-max(frames, wav.shape[0]) * sampling_rate // sr)  # ceil(S * new / orig), as resample's length
    bad = int(np.count_nonzero(~np.isfinite(wav)))
    if bad:  # float wav files can hold NaN/Inf; one such sample makes every loss NaN
        raise AudioError(path, f"{bad} of {wav.size} audio samples are NaN or Inf")
    wav = wav[:, 0] if channel == "first" else wav.mean(axis=1)  # [S]
    if sr != sampling_rate:
        wav = resample(wav, sr, sampling_rate)
    if max_samples is not None:
        wav = wav[:max_samples]
    return np.ascontiguousarray(wav, dtype=np.float32), whole


def load_audio(path, *, sampling_rate=16000, channel="first"):
    """Decode the whole of `path` -> np.ndarray [S] float32 mono at `sampling_rate` (see read_clip)."""
    return read_clip(path, sampling_rate=sampling_rate, channel=channel)[0]


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
        wav, whole = read_clip(path, sampling_rate=self.sampling_rate, channel=self.channel,
                               max_samples=self.max_samples)
        self.n_loaded += 1
        if self.max_samples is not None and whole > self.max_samples:
            if self.n_cut == 0:
                logger.warning(
                    "%s: %.2f s clip cut to %.2f s (the model's audio window); "
                    "further cuts are only counted (AudioLoader.n_cut)",
                    os.fspath(path), whole / self.sampling_rate, self.max_seconds)
            self.n_cut += 1
        return wav
