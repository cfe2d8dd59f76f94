"""Synthetic audio-question tasks with answers known by construction.

Each clip is generated from its own RNG seeded by (seed, split, index), so a set is fully
deterministic, and the first k clips of a bigger set equal a set of size k. Output is R1-AQA's
AVQA JSONL (read back with data.datasets.read_avqa / read_dataset("synthetic", ...)) plus
`task`, `difficulty` and the generating `params`; wavs are 16 kHz mono.

Tasks (answer words are single short words; choices are shuffled):
  pitch          "Is the tone high or low?"                         high / low
  count          "How many beeps are there?"                        2-5 of one..five
  loudness       "Which tone is louder, the first or the second?"   first / second
  sweep          "Is the pitch rising or falling?"                  rising / falling
  tone_or_noise  "Is this a pure tone or noise?"                    tone / noise
Difficulty narrows the gap between alternatives and adds background noise.

CLI: python -m data.synthetic --out DIR --n N --seed S --split train
"""

import argparse
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from data.prompts import prompt_corpus

logger = logging.getLogger(__name__)

SAMPLING_RATE = 16000
SYNTHETIC_TASKS = ("pitch", "count", "loudness", "sweep", "tone_or_noise")
DIFFICULTIES = ("easy", "medium", "hard")
DIFFICULTY_CHOICES = DIFFICULTIES + ("mixed",)  # "mixed": drawn per clip
NUMBER_WORDS = ("one", "two", "three", "four", "five")
PITCH_SPLIT_HZ = 500.0  # every "low" tone is below it, every "high" tone above

QUESTIONS = {
    "pitch": ("Is the tone high or low?", "Is the pitch of this sound high or low?"),
    "count": ("How many beeps are there?", "How many beeps do you hear?"),
    "loudness": ("Which tone is louder, the first or the second?",
                 "Which beep is louder, the first or the second?"),
    "sweep": ("Is the pitch rising or falling?", "Is the tone rising or falling in pitch?"),
    "tone_or_noise": ("Is this a pure tone or noise?", "Is the sound a tone or noise?"),
}
CHOICES = {
    "pitch": ("high", "low"),
    "count": NUMBER_WORDS,
    "loudness": ("first", "second"),
    "sweep": ("rising", "falling"),
    "tone_or_noise": ("tone", "noise"),
}

# per difficulty: background SNR (None = clean) and how close the alternatives are
LEVELS = {
    "easy": dict(snr_db=None, low_hz=(150, 300), high_hz=(1200, 2400), louder_db=(10, 14),
                 sweep_ratio=(3.0, 4.0), count_choices=2, count_gap=(0.06, 0.10), count_jitter_db=0.0,
                 noise_octaves=None),
    "medium": dict(snr_db=20.0, low_hz=(250, 400), high_hz=(700, 1000), louder_db=(5, 8),
                   sweep_ratio=(1.6, 2.0), count_choices=3, count_gap=(0.04, 0.08), count_jitter_db=0.0,
                   noise_octaves=1.0),
    "hard": dict(snr_db=10.0, low_hz=(380, 470), high_hz=(540, 650), louder_db=(2, 4),
                 sweep_ratio=(1.15, 1.3), count_choices=5, count_gap=(0.03, 0.05), count_jitter_db=6.0,
                 noise_octaves=1 / 3),
}


# ---------------------------------------------------------------- signal pieces


def _fade(x, sr, ms=10.0):
    """Raised-cosine on/off ramps so onsets do not click (clicks would be extra 'beeps')."""
    n = min(int(sr * ms / 1000), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _tone(rng, freq, n, sr):
    t = np.arange(n) / sr
    return _fade(np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)), sr)


def _sweep(rng, f0, f1, n, sr):
    """Exponential chirp f0 -> f1 Hz over n samples: phase = 2 pi f0 T (k^(t/T) - 1) / ln k."""
    T, t, k = n / sr, np.arange(n) / sr, f1 / f0
    phase = 2 * np.pi * f0 * T * (k ** (t / T) - 1) / np.log(k)
    return _fade(np.sin(phase + rng.uniform(0, 2 * np.pi)), sr)


def _band_noise(rng, n, sr, center=None, octaves=None):
    """White noise, or noise band-limited to `octaves` around `center` (FFT masking)."""
    x = rng.standard_normal(n)
    if octaves is not None:
        spec = np.fft.rfft(x)
        f = np.fft.rfftfreq(n, 1 / sr)
        lo, hi = center * 2 ** (-octaves / 2), center * 2 ** (octaves / 2)
        spec[(f < lo) | (f > hi)] = 0
        x = np.fft.irfft(spec, n)
    return _fade(x / (np.std(x) + 1e-12), sr)


def _place(clip, x, start):
    clip[start:start + len(x)] += x


# ---------------------------------------------------------------- tasks
# each: (rng, level, n, sr) -> (clip [n], answer word, n_choices, params)


def _pitch(rng, lv, n, sr):
    answer = rng.choice(CHOICES["pitch"])
    freq = rng.uniform(*(lv["high_hz"] if answer == "high" else lv["low_hz"]))
    m = int(n * rng.uniform(0.3, 0.7))
    clip = np.zeros(n)
    _place(clip, _tone(rng, freq, m, sr), rng.integers(0, n - m + 1))
    return clip, answer, 2, dict(freq_hz=freq)


def _count(rng, lv, n, sr):
    k = int(rng.integers(1, 6))
    beep, gaps = int(0.05 * n), [int(rng.uniform(*lv["count_gap"]) * n) for _ in range(k - 1)]
    total = k * beep + sum(gaps)
    start = int(rng.integers(0, n - total + 1))
    freq = rng.uniform(500, 2000)
    clip = np.zeros(n)
    onsets = []
    for i in range(k):
        # hard: beep levels vary by up to 6 dB, so counting cannot rely on equal peaks
        gain = 10 ** (-rng.uniform(0, lv["count_jitter_db"]) / 20)
        _place(clip, gain * _tone(rng, freq, beep, sr), start)
        onsets.append(start / sr)
        start += beep + (gaps[i] if i < k - 1 else 0)
    return clip, NUMBER_WORDS[k - 1], lv["count_choices"], dict(freq_hz=freq, onsets_s=onsets)


def _loudness(rng, lv, n, sr):
    answer = rng.choice(CHOICES["loudness"])
    diff_db = rng.uniform(*lv["louder_db"])
    freq = rng.uniform(300, 1500)
    m, gap = int(0.25 * n), int(rng.uniform(0.05, 0.15) * n)
    start = int(rng.integers(0, n - 2 * m - gap + 1))
    quiet = 10 ** (-diff_db / 20)
    g1, g2 = (1.0, quiet) if answer == "first" else (quiet, 1.0)
    clip = np.zeros(n)
    _place(clip, g1 * _tone(rng, freq, m, sr), start)
    _place(clip, g2 * _tone(rng, freq, m, sr), start + m + gap)
    return clip, answer, 2, dict(freq_hz=freq, diff_db=diff_db)


def _sweep_task(rng, lv, n, sr):
    answer = rng.choice(CHOICES["sweep"])
    ratio = rng.uniform(*lv["sweep_ratio"])
    center = np.exp(rng.uniform(np.log(300), np.log(1500)))
    lo, hi = center / np.sqrt(ratio), center * np.sqrt(ratio)
    f0, f1 = (lo, hi) if answer == "rising" else (hi, lo)
    m = int(n * rng.uniform(0.5, 0.8))
    clip = np.zeros(n)
    _place(clip, _sweep(rng, f0, f1, m, sr), rng.integers(0, n - m + 1))
    return clip, answer, 2, dict(f0_hz=f0, f1_hz=f1)


def _tone_or_noise(rng, lv, n, sr):
    answer = rng.choice(CHOICES["tone_or_noise"])
    center = np.exp(rng.uniform(np.log(300), np.log(3000)))
    m = int(n * rng.uniform(0.4, 0.8))
    # harder: the noise is narrower band, so it sounds more tone-like
    x = (_tone(rng, center, m, sr) if answer == "tone"
         else _band_noise(rng, m, sr, center, lv["noise_octaves"]) / np.sqrt(2))
    clip = np.zeros(n)
    _place(clip, x, rng.integers(0, n - m + 1))
    return clip, answer, 2, dict(center_hz=center)


TASK_FNS = {"pitch": _pitch, "count": _count, "loudness": _loudness, "sweep": _sweep_task,
            "tone_or_noise": _tone_or_noise}


def _choices(rng, task, answer, n_choices):
    """n_choices words including the answer, in random order."""
    others = [c for c in CHOICES[task] if c != answer]
    picked = [answer] + list(rng.choice(others, size=n_choices - 1, replace=False))
    return [str(c) for c in rng.permutation(picked)]


def make_clip(seed, split, index, task, difficulty, clip_seconds=2.0, sr=SAMPLING_RATE):
    """One example -> (waveform [n] float32, question, choices, answer, difficulty, params)."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    if difficulty == "mixed":
        difficulty = str(rng.choice(DIFFICULTIES))
    lv = LEVELS[difficulty]
    n = int(round(clip_seconds * sr))
    clip, answer, n_choices, params = TASK_FNS[task](rng, lv, n, sr)
    answer = str(answer)
    if lv["snr_db"] is not None:  # background noise relative to the active signal's power
        active = clip[np.abs(clip) > 1e-6]
        rms = np.sqrt(np.mean(active ** 2))
        clip = clip + rng.standard_normal(n) * rms * 10 ** (-lv["snr_db"] / 20)
    clip = clip / (np.max(np.abs(clip)) + 1e-12) * rng.uniform(0.3, 0.9)  # random overall level
    question = str(rng.choice(QUESTIONS[task]))
    choices = _choices(rng, task, answer, n_choices)
    params = {k: (float(v) if np.isscalar(v) else [float(u) for u in v]) for k, v in params.items()}
    return clip.astype(np.float32), question, choices, answer, difficulty, params


def _atomic_write_wav(path, wav, sr, subtype):
    tmp = path.with_name(path.name + ".tmp")
    sf.write(tmp, wav, sr, subtype=subtype, format="WAV")
    os.replace(tmp, path)


def generate_synthetic(out_dir, *, n, seed, tasks=None, difficulty="easy", clip_seconds=2.0,
                       split="train", subtype="PCM_16", progress=True):
    """Write n clips to out_dir/audio/<split>/ and out_dir/<split>.jsonl; return the JSONL path.

    Tasks cycle in order (balanced); difficulty is one of easy/medium/hard or "mixed".
    Each wav and the JSONL are written to a temp file then renamed, and the JSONL last, so a
    JSONL on disk always describes a complete set.
    """
    tasks = tuple(tasks) if tasks is not None else SYNTHETIC_TASKS
    unknown = [t for t in tasks if t not in TASK_FNS]
    if not tasks or unknown:
        raise ValueError(f"unknown synthetic tasks {unknown}; choose from {SYNTHETIC_TASKS}")
    if difficulty not in DIFFICULTY_CHOICES:
        raise ValueError(f"difficulty must be one of {DIFFICULTY_CHOICES}, got {difficulty!r}")
    if clip_seconds < 0.5:
        raise ValueError(f"clip_seconds must be >= 0.5, got {clip_seconds}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in tqdm(range(n), desc=f"synthetic {split}", disable=not progress):
        task = tasks[i % len(tasks)]
        wav, question, choices, answer, diff, params = make_clip(
            seed, split, i, task, difficulty, clip_seconds)
        clip_id = f"syn-{split}-{i:06d}"
        _atomic_write_wav(audio_dir / f"{clip_id}.wav", wav, SAMPLING_RATE, subtype)
        lines.append(json.dumps({
            "id": clip_id, "video_name": clip_id, "video_id": clip_id,
            "question_text": question, "multi_choice": choices, "answer": choices.index(answer),
            "question_relation": "Sound", "question_type": task, "dataset_name": "synthetic",
            "audio_path": f"audio/{split}/{clip_id}.wav", "task": task, "difficulty": diff,
            "params": params,
        }))
    jsonl = out_dir / f"{split}.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, jsonl)
    logger.info("wrote %d synthetic clips (%s, %s) to %s", n, ",".join(tasks), difficulty, jsonl)
    return jsonl


def synthetic_corpus():
    """Every string a synthetic prompt or answer can contain, for training a tiny tokenizer:
    each question under each template (with its full choice list), and each answer target."""
    return prompt_corpus({t: CHOICES[t] for t in SYNTHETIC_TASKS}, QUESTIONS)


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate a synthetic audio QA set (AVQA JSONL + wavs).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(SYNTHETIC_TASKS)}")
    p.add_argument("--difficulty", default="easy", choices=DIFFICULTY_CHOICES)
    p.add_argument("--clip-seconds", type=float, default=2.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tasks = args.tasks.split(",") if args.tasks else None
    path = generate_synthetic(args.out, n=args.n, seed=args.seed, tasks=tasks,
                              difficulty=args.difficulty, clip_seconds=args.clip_seconds,
                              split=args.split)
    print(path)


if __name__ == "__main__":
    main()
