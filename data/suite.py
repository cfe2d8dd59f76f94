"""A harder synthetic audio question suite, shaped like MMAU: 2-4 options, nine skills.

Every question is built in code from its own RNG seeded by (seed, split, index), so a set is
deterministic and the first k questions of a bigger set equal a set of size k. Output is the
same AVQA-style JSONL as data/synthetic.py (read with data.datasets.read_avqa or
read_dataset("synthetic", ...)); each record keeps its skill as ``task`` and the generating
values as ``params``. Wavs are 16 kHz mono of varying length.

Skills (domain; options; what decides the answer):
  count       sound   4 of one..six         how many beeps (1-6)
  order       sound   tone / noise          which came first, a pure tone or a noise burst
  longer      sound   first / second        which of two tones lasts longer (ratio 1.6-2.5)
  louder      sound   first/second/third    which of three tones is louder (by 6-10 dB)
  odd         sound   first..fourth         which of four tones has another pitch (x or / 1.3-1.6)
  interval    music   rising / falling      a two-note interval of 2-7 semitones, up or down
  chord       music   major / minor         a root-position triad (third of 4 or 3 semitones)
  rhythm      music   fast / slow           pulses every 0.10-0.14 s (fast) or 0.28-0.40 s (slow)
  voice       speech  high / low            a voiced buzz, f0 90-140 Hz (low) or 200-280 Hz (high)

Every answer is drawn uniformly from its options and the options are listed in a random order,
and the wording does not depend on the answer: from the text alone a question is at chance.

Distributions. ``train`` and ``test`` (the in-distribution held-out split: another RNG stream)
draw from IN_DISTRIBUTION; ``shifted`` draws from SHIFTED, which shares none of these ranges:

  axis            in-distribution (train, test)           shifted
  clip_seconds    [1.2, 2.0]                              [2.4, 3.0]
  snr_db          clean (half) or [20, 30]                [6, 12]
  carrier_hz      [250, 1200]                             [1500, 3000]
  wording         question wordings 0 and 1               wording 2 (never seen in training)

``carrier_hz`` is each skill's nuisance frequency, which never decides the answer: the beeps'
pitch (count, longer, louder, rhythm), the tone's pitch (order), the common pitch of the three
equal tones (odd), the first note (interval), the chord's root (chord), and the centre of the
voice's formant (voice). SNR is the background noise's level below the active signal's power.
So every shifted question lies outside the training distribution on all four axes at once
(``in_distribution(params)`` and ``is_shifted(params)`` state the rule; tests check it).

CLI: python -m data.suite --out DIR --n N --seed S --split train
"""

import argparse
import json
import os
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

from data.prompts import prompt_corpus

SAMPLING_RATE = 16000
SPLITS = ("train", "test", "shifted")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
ORDINALS = ("first", "second", "third", "fourth")


class Distribution(dict):
    """The ranges a split draws from (see the module docstring)."""


IN_DISTRIBUTION = Distribution(clip_seconds=(1.2, 2.0), snr_db=(20.0, 30.0), clean_fraction=0.5,
                               carrier_hz=(250.0, 1200.0), wordings=(0, 1))
SHIFTED = Distribution(clip_seconds=(2.4, 3.0), snr_db=(6.0, 12.0), clean_fraction=0.0,
                       carrier_hz=(1500.0, 3000.0), wordings=(2,))
DISTRIBUTIONS = {"train": IN_DISTRIBUTION, "test": IN_DISTRIBUTION, "shifted": SHIFTED}

# Three wordings per skill: training sees the first two, the shifted split only the third.
QUESTIONS = {
    "count": ("How many beeps are there?", "How many beeps do you hear?",
              "Count the short sounds in the clip: how many are there?"),
    "order": ("Which came first, the tone or the noise?", "Which sound is heard first, the tone or the noise?",
              "Of the noise and the tone, which one starts earlier?"),
    "longer": ("Which tone is longer, the first or the second?", "Which beep lasts longer, the first or the second?",
               "Of the two sounds, which has the greater duration?"),
    "louder": ("Which tone is the loudest?", "Which of the three beeps is louder than the others?",
               "One of the sounds has more volume. Which one?"),
    "odd": ("Which tone is the odd one out?", "Which beep has a different pitch from the others?",
            "Three sounds match and one does not. Which one differs?"),
    "interval": ("Is the second note higher or lower: rising or falling?", "Does the melody go up or down?",
                 "Is the interval between the two notes ascending or descending?"),
    "chord": ("Is the chord major or minor?", "Is this chord a major or a minor chord?",
              "What is the quality of the triad played?"),
    "rhythm": ("Is the rhythm fast or slow?", "Are the pulses fast or slow?",
               "What is the tempo of the repeated clicks?"),
    "voice": ("Is the voice high or low?", "Is the speaker's voice high-pitched or low-pitched?",
              "Would you call the pitch of this voice high or low?"),
}
OPTIONS = {
    "count": NUMBER_WORDS, "order": ("tone", "noise"), "longer": ORDINALS[:2], "louder": ORDINALS[:3],
    "odd": ORDINALS, "interval": ("rising", "falling"), "chord": ("major", "minor"),
    "rhythm": ("fast", "slow"), "voice": ("high", "low"),
}
NUM_CHOICES = {"count": 4, "order": 2, "longer": 2, "louder": 3, "odd": 4, "interval": 2, "chord": 2,
               "rhythm": 2, "voice": 2}
SKILLS = tuple(QUESTIONS)
DOMAINS = {"count": "sound", "order": "sound", "longer": "sound", "louder": "sound", "odd": "sound",
           "interval": "music", "chord": "music", "rhythm": "music", "voice": "speech"}


# ---------------------------------------------------------------- signal pieces


def _fade(x, ms=8.0, sr=SAMPLING_RATE):
    """Raised-cosine ramps so onsets do not click (a click would be an extra event)."""
    n = min(int(sr * ms / 1000), len(x) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n))
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _tone(rng, freq, seconds, sr=SAMPLING_RATE):
    t = np.arange(int(seconds * sr)) / sr
    return _fade(np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)))


def _noise_burst(rng, seconds, sr=SAMPLING_RATE):
    x = rng.standard_normal(int(seconds * sr))
    return _fade(x / np.std(x) / np.sqrt(2))  # the power of a unit sine


def _voice(rng, f0, formant_hz, seconds, sr=SAMPLING_RATE):
    """A voiced, speech-like buzz: harmonics of f0 (gliding +-4 %, like intonation) under one
    formant (a Gaussian spectral envelope around formant_hz) and a 1/k roll-off."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f_inst = f0 * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f_inst) / sr
    x = np.zeros(n)
    for k in range(1, int(4000 / f0) + 1):
        gain = np.exp(-0.5 * ((k * f0 - formant_hz) / 300.0) ** 2) + 0.3 / k
        x += gain * np.sin(k * phase)
    return _fade(x / (np.sqrt(np.mean(x ** 2)) + 1e-12) / np.sqrt(2))


def _layout(rng, clip_n, pieces, gap_s=(0.05, 0.10), sr=SAMPLING_RATE):
    """Place `pieces` one after another, random gaps between them, at a random start; returns
    (clip [clip_n], onsets in seconds). Raises when they cannot fit (a generator bug)."""
    gaps = [int(rng.uniform(*gap_s) * sr) for _ in pieces[1:]]
    total = sum(len(p) for p in pieces) + sum(gaps)
    if total > clip_n:
        raise ValueError(f"{total} samples of events do not fit a clip of {clip_n}")
    start = int(rng.integers(0, clip_n - total + 1))
    clip, onsets = np.zeros(clip_n), []
    for i, p in enumerate(pieces):
        clip[start:start + len(p)] += p
        onsets.append(start / sr)
        start += len(p) + (gaps[i] if i < len(gaps) else 0)
    return clip, onsets


# ---------------------------------------------------------------- skills
# each: (rng, carrier_hz, clip_n) -> (clip [clip_n], answer, params)


def _count(rng, f, n):
    k = int(rng.integers(1, 7))
    beeps = [_tone(rng, f, rng.uniform(0.06, 0.09)) for _ in range(k)]
    clip, onsets = _layout(rng, n, beeps, gap_s=(0.05, 0.08))
    return clip, NUMBER_WORDS[k - 1], dict(count=k, onsets_s=onsets)


def _order(rng, f, n):
    answer = str(rng.choice(OPTIONS["order"]))
    tone, noise = _tone(rng, f, rng.uniform(0.25, 0.4)), _noise_burst(rng, rng.uniform(0.25, 0.4))
    clip, onsets = _layout(rng, n, [tone, noise] if answer == "tone" else [noise, tone], gap_s=(0.05, 0.15))
    return clip, answer, dict(onsets_s=onsets)


def _longer(rng, f, n):
    answer = str(rng.choice(OPTIONS["longer"]))
    short, ratio = rng.uniform(0.15, 0.3), rng.uniform(1.6, 2.5)
    durations = (short * ratio, short) if answer == "first" else (short, short * ratio)
    clip, onsets = _layout(rng, n, [_tone(rng, f, d) for d in durations], gap_s=(0.05, 0.1))
    return clip, answer, dict(durations_s=list(durations), onsets_s=onsets)


def _louder(rng, f, n):
    loud = int(rng.integers(0, 3))
    diff_db = rng.uniform(6.0, 10.0)
    gains = [1.0 if i == loud else 10 ** (-diff_db / 20) for i in range(3)]
    clip, onsets = _layout(rng, n, [g * _tone(rng, f, 0.2) for g in gains], gap_s=(0.05, 0.1))
    return clip, ORDINALS[loud], dict(diff_db=diff_db, onsets_s=onsets)


def _odd(rng, f, n):
    odd = int(rng.integers(0, 4))
    ratio = rng.uniform(1.3, 1.6) ** rng.choice([-1, 1])
    freqs = [f * ratio if i == odd else f for i in range(4)]
    clip, onsets = _layout(rng, n, [_tone(rng, x, 0.18) for x in freqs], gap_s=(0.05, 0.1))
    return clip, ORDINALS[odd], dict(freqs_hz=freqs, onsets_s=onsets)


def _interval(rng, f, n):
    answer = str(rng.choice(OPTIONS["interval"]))
    semitones = int(rng.integers(2, 8)) * (1 if answer == "rising" else -1)
    second = f * 2 ** (semitones / 12)
    clip, onsets = _layout(rng, n, [_tone(rng, f, rng.uniform(0.3, 0.45)), _tone(rng, second, rng.uniform(0.3, 0.45))],
                           gap_s=(0.03, 0.08))
    return clip, answer, dict(freqs_hz=[f, second], semitones=semitones, onsets_s=onsets)


def _chord(rng, f, n):
    answer = str(rng.choice(OPTIONS["chord"]))
    third = 4 if answer == "major" else 3
    freqs = [f, f * 2 ** (third / 12), f * 2 ** (7 / 12)]
    seconds = rng.uniform(0.6, 1.0)
    x = _fade(sum(_tone(rng, x, seconds) for x in freqs) / np.sqrt(3))
    clip, onsets = _layout(rng, n, [x])
    return clip, answer, dict(freqs_hz=freqs, onsets_s=onsets)


def _rhythm(rng, f, n):
    answer = str(rng.choice(OPTIONS["rhythm"]))
    ioi = rng.uniform(0.10, 0.14) if answer == "fast" else rng.uniform(0.28, 0.40)
    pulse = 0.04
    k = max(3, int((n / SAMPLING_RATE - 0.1) / ioi))
    pieces = [_tone(rng, f, pulse) for _ in range(k)]
    gap = ioi - pulse
    clip, onsets = _layout(rng, n, pieces, gap_s=(gap, gap))
    return clip, answer, dict(ioi_s=ioi, onsets_s=onsets)


def _voice_skill(rng, f, n):
    answer = str(rng.choice(OPTIONS["voice"]))
    f0 = rng.uniform(200, 280) if answer == "high" else rng.uniform(90, 140)
    clip, onsets = _layout(rng, n, [_voice(rng, f0, f, rng.uniform(0.6, 1.0))])
    return clip, answer, dict(f0_hz=f0, onsets_s=onsets)


SKILL_FNS = {"count": _count, "order": _order, "longer": _longer, "louder": _louder, "odd": _odd,
             "interval": _interval, "chord": _chord, "rhythm": _rhythm, "voice": _voice_skill}


# ---------------------------------------------------------------- questions


def _rng(seed, split, index):
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _choices(rng, skill, answer):
    """NUM_CHOICES[skill] options including the answer, in random order. count: three other
    numbers of one..six; the ordinal skills: all their ordinals."""
    others = [o for o in OPTIONS[skill] if o != answer]
    picked = [answer] + [str(o) for o in rng.choice(others, size=NUM_CHOICES[skill] - 1, replace=False)]
    return [str(c) for c in rng.permutation(picked)]


def make_question(seed, split, index, skill):
    """One question -> (waveform [n] float32, question, choices, answer, params)."""
    if split not in DISTRIBUTIONS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if skill not in SKILL_FNS:
        raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")
    dist = DISTRIBUTIONS[split]
    rng = _rng(seed, split, index)
    clip_seconds = float(rng.uniform(*dist["clip_seconds"]))
    carrier = float(np.exp(rng.uniform(*np.log(dist["carrier_hz"]))))
    n = int(round(clip_seconds * SAMPLING_RATE))
    clip, answer, params = SKILL_FNS[skill](rng, carrier, n)
    snr = None if rng.uniform() < dist["clean_fraction"] else float(rng.uniform(*dist["snr_db"]))
    if snr is not None:  # background noise relative to the active signal's power
        active = clip[np.abs(clip) > 1e-6]
        clip = clip + rng.standard_normal(n) * np.sqrt(np.mean(active ** 2)) * 10 ** (-snr / 20)
    clip = clip / (np.max(np.abs(clip)) + 1e-12) * rng.uniform(0.3, 0.9)  # random overall level
    wording = int(rng.choice(dist["wordings"]))
    choices = _choices(rng, skill, answer)
    params = {**params, "clip_seconds": clip_seconds, "carrier_hz": carrier, "snr_db": snr, "wording": wording}
    return clip.astype(np.float32), QUESTIONS[skill][wording], choices, answer, params


def in_distribution(params):
    """True when a question's params lie inside IN_DISTRIBUTION on every axis."""
    d = IN_DISTRIBUTION
    return (d["clip_seconds"][0] <= params["clip_seconds"] <= d["clip_seconds"][1]
            and d["carrier_hz"][0] <= params["carrier_hz"] <= d["carrier_hz"][1]
            and (params["snr_db"] is None or d["snr_db"][0] <= params["snr_db"] <= d["snr_db"][1])
            and params["wording"] in d["wordings"])


def is_shifted(params):
    """True when a question's params lie outside IN_DISTRIBUTION on every axis (the shift rule)."""
    d = IN_DISTRIBUTION
    return (not d["clip_seconds"][0] <= params["clip_seconds"] <= d["clip_seconds"][1]
            and not d["carrier_hz"][0] <= params["carrier_hz"] <= d["carrier_hz"][1]
            and params["snr_db"] is not None and not d["snr_db"][0] <= params["snr_db"] <= d["snr_db"][1]
            and params["wording"] not in d["wordings"])


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(u) for u in v]
    return v if v is None or isinstance(v, (str, int)) else float(v)


def write_suite(out_dir, *, n, seed, split, skills=None, subtype="PCM_16"):
    """Write n questions to out_dir/audio/<split>/ and out_dir/<split>.jsonl; return the JSONL path.

    Skills cycle in order (balanced). Each wav is written to a temp file then renamed, and the
    JSONL last, so a JSONL on disk always describes a complete set.
    """
    skills = tuple(skills) if skills is not None else SKILLS
    unknown = [s for s in skills if s not in SKILL_FNS]
    if not skills or unknown:
        raise ValueError(f"unknown skills {unknown}; choose from {SKILLS}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        skill = skills[i % len(skills)]
        wav, question, choices, answer, params = make_question(seed, split, i, skill)
        clip_id = f"suite-{split}-{i:06d}"
        path = audio_dir / f"{clip_id}.wav"
        tmp = path.with_name(path.name + ".tmp")
        sf.write(tmp, wav, SAMPLING_RATE, subtype=subtype, format="WAV")
        os.replace(tmp, path)
        lines.append(json.dumps({
            "id": clip_id, "video_name": clip_id, "video_id": clip_id,
            "question_text": question, "multi_choice": choices, "answer": choices.index(answer),
            "question_relation": DOMAINS[skill], "question_type": skill, "dataset_name": "suite",
            "audio_path": f"audio/{split}/{clip_id}.wav", "task": skill, "split": split,
            "params": {k: _jsonable(v) for k, v in params.items()},
        }))
    jsonl = out_dir / f"{split}.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, jsonl)
    return jsonl


def suite_corpus():
    """Every string a suite prompt or answer can contain, for training a tiny tokenizer."""
    return prompt_corpus({t: OPTIONS[t] for t in SKILLS}, QUESTIONS)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the audio question suite (AVQA-style JSONL + wavs).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--skills", default=None, help=f"comma-separated subset of {','.join(SKILLS)}")
    args = p.parse_args(argv)
    print(write_suite(args.out, n=args.n, seed=args.seed, split=args.split,
                      skills=args.skills.split(",") if args.skills else None))


if __name__ == "__main__":
    main()
