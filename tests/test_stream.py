"""The training-question stream: deterministic, rank-disjoint, resumable, and honest about skips."""

import numpy as np
import pytest

from data.audio import AudioError
from data.datasets import Sample
from grpo.stream import PromptStream

SAMPLES = [Sample(id=f"s{i}", audio_path=f"/clips/{i}.wav", question="?", choices=["a", "b"], answer="a", task=None)
           for i in range(10)]


def load(path):
    return np.full(4, float(path.split("/")[-1].split(".")[0]), dtype=np.float32)


def ids(stream, n):
    samples, _ = stream.take(n)
    return [s.id for s in samples]


def test_same_seed_same_order_and_every_question_once_per_epoch():
    a, b = PromptStream(SAMPLES, load, seed=3), PromptStream(SAMPLES, load, seed=3)
    first = ids(a, 10)
    assert first == ids(b, 10) and sorted(first) == sorted(s.id for s in SAMPLES)
    assert ids(a, 10) != first  # the next epoch is reshuffled
    assert first != ids(PromptStream(SAMPLES, load, seed=4), 10)


def test_ranks_split_the_single_rank_order_and_share_positions():
    single = PromptStream(SAMPLES, load, seed=1)
    whole = ids(single, 10)
    positions = single.positions
    r0, r1 = (PromptStream(SAMPLES, load, seed=1, rank=r, world_size=2) for r in (0, 1))
    got0, got1 = ids(r0, 5), ids(r1, 5)
    assert got0 == whole[0::2] and got1 == whole[1::2]
    assert r0.positions == positions[0::2] and r1.positions == positions[1::2]


def test_state_dict_resumes_exactly():
    a = PromptStream(SAMPLES, load, seed=2)
    ids(a, 13)  # into the second epoch
    b = PromptStream(SAMPLES, load, seed=2)
    b.load_state_dict(a.state_dict())
    assert ids(a, 12) == ids(b, 12)


def test_unreadable_audio_raises_or_is_a_counted_skip():
    def flaky(path):
        if path.endswith("/3.wav"):
            raise AudioError(path, "cannot decode")
        return load(path)

    with pytest.raises(AudioError, match="3.wav"):
        ids(PromptStream(SAMPLES, flaky, seed=0, shuffle=False), 10)
    skipping = PromptStream(SAMPLES, flaky, seed=0, shuffle=False, on_error="skip")
    got = ids(skipping, 9)
    assert "s3" not in got and len(got) == 9 and skipping.skipped["audio"] == 1


def test_filter_and_silence_control():
    stream = PromptStream(SAMPLES, load, seed=0, shuffle=False, keep=lambda s, w: s.id != "s0", silence=True)
    samples, waves = stream.take(9)
    assert "s0" not in [s.id for s in samples] and stream.skipped["filtered"] == 1
    assert all(not w.any() for w in waves) and all(w.shape == (4,) for w in waves)


def test_nothing_usable_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="no usable training sample"):
        PromptStream(SAMPLES, load, seed=0, keep=lambda s, w: False).take(1)
