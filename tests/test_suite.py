"""The audio question suite (data/suite.py): deterministic, the shift rule holds, the answer is
in the audio (a scripted numpy oracle reads it) and not in the text (a text-only guess is at chance)."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from data.datasets import read_dataset
from data.suite import (IN_DISTRIBUTION, NUM_CHOICES, ORDINALS, SAMPLING_RATE, SHIFTED, SKILLS, in_distribution,
                        is_shifted, make_question, write_suite)

SR = SAMPLING_RATE


# ---------------------------------------------------------------- a scripted oracle


def _spectrogram(x, frame=512, hop=160):
    """|STFT| [frames, bins] with a Hann window, and the bins' frequencies."""
    x = np.pad(x, (0, max(0, frame - len(x))))
    n = 1 + (len(x) - frame) // hop
    idx = np.arange(frame)[None, :] + hop * np.arange(n)[:, None]
    return np.abs(np.fft.rfft(x[idx] * np.hanning(frame), axis=1)), np.fft.rfftfreq(frame, 1 / SR)


def _peak_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    f = np.fft.rfftfreq(len(x), 1 / SR)
    spec[f < 60] = 0
    return f[np.argmax(spec)]


def _segments(active, min_frames=2):
    """Runs of True in a frame mask -> [(first, last + 1)], short runs dropped."""
    edges = np.diff(np.concatenate([[0], active.astype(int), [0]]))
    runs = list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))
    return [(a, b) for a, b in runs if b - a >= min_frames]


def _band_energy(x, lo, hi):
    spec, f = _spectrogram(x)
    return spec[:, (f >= lo) & (f <= hi)].max(axis=1)  # [frames]


def _events(x, f, width=1.12, threshold=0.15):
    """Segments (frames) of energy near the carrier f."""
    e = _band_energy(x, f / width, f * width)
    return _segments(e > threshold * e.max()), e


def oracle(wav, skill):
    """The answer read from the clip alone."""
    if skill in ("count", "longer", "louder", "rhythm"):
        segs, e = _events(wav, _peak_hz(wav))
        if skill == "count":
            return ("one", "two", "three", "four", "five", "six")[len(segs) - 1]
        if skill == "longer":
            return "first" if segs[0][1] - segs[0][0] > segs[1][1] - segs[1][0] else "second"
        if skill == "louder":
            return ORDINALS[int(np.argmax([e[a:b].max() for a, b in segs]))]
        return "fast" if np.median(np.diff([a for a, _ in segs])) * 0.01 < 0.2 else "slow"
    if skill in ("odd", "interval"):
        spec, f = _spectrogram(wav)
        spec[:, f < 60] = 0
        peak = spec.max(axis=1)
        segs = _segments(peak > 0.2 * peak.max())
        freqs = np.array([_peak_hz(wav[a * 160 : b * 160 + 512]) for a, b in segs])
        if skill == "interval":
            return "rising" if freqs[-1] > freqs[0] else "falling"
        return ORDINALS[int(np.argmax(np.abs(np.log(freqs / np.median(freqs)))))]
    if skill == "order":
        f = _peak_hz(wav)
        tone = _band_energy(wav, f - max(0.06 * f, 35), f + max(0.06 * f, 35))
        spec, freqs = _spectrogram(wav)
        broad = np.median(spec[:, (freqs > 100) & ((freqs < f / 1.5) | (freqs > f * 1.5))], axis=1)
        first_tone = _segments(tone > 0.3 * tone.max())[0][0]
        first_noise = _segments(broad > 0.5 * broad.max())[0][0]
        return "tone" if first_tone < first_noise else "noise"
    if skill == "chord":
        spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
        f = np.fft.rfftfreq(len(wav), 1 / SR)
        peaks = []
        for _ in range(3):  # the three strongest peaks, each masking +-4 % around it
            i = int(np.argmax(spec))
            peaks.append(f[i])
            spec[(f > f[i] / 1.04) & (f < f[i] * 1.04)] = 0
        lo, mid, _ = sorted(peaks)
        return "major" if 12 * np.log2(mid / lo) > 3.5 else "minor"
    if skill == "voice":
        # the f0 whose harmonics below 1.2 kHz hold the most energy on average (a subharmonic
        # f0 / 2 scores lower: half its 'harmonics' fall between the real ones; 2 f0 about the same)
        e = _band_energy(wav, 60, 4000)
        a, b = max(_segments(e > 0.3 * e.max()), key=lambda s: s[1] - s[0])
        x = wav[a * 160 : b * 160 + 512]
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        f = np.fft.rfftfreq(len(x), 1 / SR)
        pooled = np.array([spec[(f > c / 1.04) & (f < c * 1.04)].max() for c in np.arange(80, 1200, 2.0)])
        candidates = np.arange(80, 300, 1.0)
        score = [np.mean([pooled[int((k * c - 80) / 2)] for k in range(1, int(1190 / c) + 1)]) for c in candidates]
        best = candidates[np.flatnonzero(np.array(score) >= 0.8 * max(score))[0]]  # 2 f0 scores alike: take the lowest
        return "high" if best > 170 else "low"
    raise ValueError(skill)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("split", ["train", "shifted"])
def test_the_generator_is_deterministic_per_seed(split):
    for skill in SKILLS:
        a, b = make_question(3, split, 7, skill), make_question(3, split, 7, skill)
        other = make_question(4, split, 7, skill)
        assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
        assert not np.array_equal(a[0][: len(other[0])], other[0][: len(a[0])])


def test_written_sets_are_deterministic_and_read_back(tmp_path):
    p1 = write_suite(tmp_path / "a", n=18, seed=0, split="train")
    p2 = write_suite(tmp_path / "b", n=18, seed=0, split="train")
    assert p1.read_text() == p2.read_text()
    samples = read_dataset("synthetic", str(p1), unique_choices=True)
    assert [s.task for s in samples] == list(SKILLS) * 2
    assert all(s.answer in s.choices and len(s.choices) == NUM_CHOICES[s.task] for s in samples)


@pytest.mark.parametrize("skill", SKILLS)
def test_the_shifted_split_never_overlaps_the_training_distribution(skill):
    for i in range(40):
        train, test, shifted = (make_question(0, s, i, skill)[4] for s in ("train", "test", "shifted"))
        assert in_distribution(train) and in_distribution(test) and not is_shifted(train)
        assert is_shifted(shifted) and not in_distribution(shifted)
        assert make_question(0, "shifted", i, skill)[1] not in {make_question(0, "train", j, skill)[1]
                                                                 for j in range(10)}
    # the stated ranges are disjoint on every axis
    for axis in ("clip_seconds", "carrier_hz", "snr_db"):
        (a, b), (c, d) = IN_DISTRIBUTION[axis], SHIFTED[axis]
        assert b < c or d < a, axis
    assert not set(IN_DISTRIBUTION["wordings"]) & set(SHIFTED["wordings"])


@pytest.mark.slow  # 18 cases of a few seconds each
@pytest.mark.parametrize("split", ["train", "shifted"])
@pytest.mark.parametrize("skill", SKILLS)
def test_a_scripted_oracle_recovers_each_answer_from_the_audio(skill, split):
    n = 24
    right = sum(oracle(wav.astype(np.float64), skill) == answer
                for wav, _, _, answer, _ in (make_question(1, split, i, skill) for i in range(n)))
    assert right == n, f"{skill}/{split}: oracle {right}/{n}"


def test_a_text_only_guess_is_at_chance():
    """Majority answer per (question, choices) text and per answer position, fitted on one seed's
    training questions, scored on another's: near 1 / num_choices on each skill."""
    def questions(seed, n):
        return [make_question(seed, "train", i, skill)[1:4] for skill in SKILLS for i in range(n)]
    fit = questions(0, 200)
    by_text, by_pos = defaultdict(Counter), defaultdict(Counter)
    for q, choices, answer in fit:
        by_text[(q, tuple(choices))][answer] += 1
        by_pos[q][choices.index(answer)] += 1
    scores = defaultdict(list)
    for (q, choices, answer), skill in zip(questions(1, 200), [s for s in SKILLS for _ in range(200)]):
        guess = by_text[(q, tuple(choices))].most_common(1)
        guess = guess[0][0] if guess else choices[by_pos[q].most_common(1)[0][0]]
        scores[skill].append(guess == answer)
    for skill, hits in scores.items():
        chance = 1 / NUM_CHOICES[skill]
        assert abs(np.mean(hits) - chance) < 0.12, f"{skill}: text-only {np.mean(hits):.2f}, chance {chance:.2f}"
