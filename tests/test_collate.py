import numpy as np
import pytest
import torch

from data.collate import collate_prompts
from data.datasets import Sample
from data.prompts import format_prompt
from data.synthetic import synthetic_corpus

SR = 16000
WINDOW_S = 3  # the tiny processor's audio window

pytestmark = pytest.mark.slow  # builds a tiny checkpoint (a few seconds on 2 cores)


def _fallback_processor():
    """A throwaway Qwen2-Audio processor (byte-level tokenizer) if models.tiny is unavailable."""
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens":
                            ["<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]})
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, hop_length=160, chunk_length=WINDOW_S, n_fft=400)
    return Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    try:
        from models.loading import load_processor
        from models.tiny import build_tiny_checkpoint
    except ImportError:
        return _fallback_processor()
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0, corpus=synthetic_corpus(),
                                 audio_seconds=WINDOW_S)
    return load_processor(path)


def _samples(n):
    qs = ["Is the tone high or low?", "How many beeps are there?", "Which tone is louder, the first or the second?"]
    cs = [["high", "low"], ["three", "one", "five"], ["second", "first"]]
    return [Sample(id=str(i), audio_path=f"/x/{i}.wav", question=qs[i % 3], choices=cs[i % 3],
                   answer=cs[i % 3][0], task=None, meta={}) for i in range(n)]


def _expected_audio_tokens(n_samples):
    frames = min(n_samples, WINDOW_S * SR) // 160  # mel frames of real audio (100 per second)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1  # encoder conv stride 2, then pooling stride 2


def test_collate_prompts_left_pads_and_expands_audio(processor):
    processor.tokenizer.padding_side = "right"  # collate must force left padding anyway
    seconds = [0.5, 2.9, 1.0, 2.0]  # the longest clip need not have the longest question
    waves = [np.random.default_rng(i).standard_normal(int(s * SR)).astype(np.float32) * 0.1
             for i, s in enumerate(seconds)]
    samples = _samples(4)
    b = collate_prompts(samples, waves, processor, template=2)
    assert set(b) == {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
    B, P = b["input_ids"].shape
    assert B == 4 and b["attention_mask"].shape == (4, P)
    assert b["input_features"].shape == (4, 128, WINDOW_S * 100)
    assert b["feature_attention_mask"].shape == (4, WINDOW_S * 100)
    assert b["feature_attention_mask"].sum(1).tolist() == [int(s * 100) for s in seconds]

    tok = processor.tokenizer
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    n_audio = (b["input_ids"] == audio_id).sum(1).tolist()
    assert n_audio == [_expected_audio_tokens(len(w)) for w in waves] == [12, 72, 25, 50]
    lengths = b["attention_mask"].sum(1)
    assert lengths.max() == P and lengths.min() < P
    for i in range(B):
        L = int(lengths[i])
        # left padding: zeros then ones, pad ids on the left, the real tokens flush right
        assert b["attention_mask"][i].tolist() == [0] * (P - L) + [1] * L
        assert (b["input_ids"][i, :P - L] == tok.pad_token_id).all()
        text = tok.decode(b["input_ids"][i, P - L:])
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                               "Audio 1: <|audio_bos|><|AUDIO|>")
        assert text.endswith("<|audio_eos|>\n" + format_prompt(samples[i].question, samples[i].choices, 2)
                             + "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        collate_prompts(samples, waves[:3], processor, template=2)


def test_selected_rows_of_two_batches_equal_collating_those_questions_again(processor):
    """Dynamic sampling gathers its chosen groups from several rounds' prompt batches; that must
    be exactly the batch the processor makes of those questions (padding, ids, features)."""
    from grpo.rollout import select_prompts

    seconds = [0.5, 2.9, 1.0, 2.0, 1.5]
    waves = [np.random.default_rng(i).standard_normal(int(s * SR)).astype(np.float32) * 0.1
             for i, s in enumerate(seconds)]
    samples = _samples(5)
    first = collate_prompts(samples[:3], waves[:3], processor, template=2)
    second = collate_prompts(samples[3:], waves[3:], processor, template=2)
    chosen = [(second, 1), (first, 0), (first, 2)]  # questions 4, 0, 2: narrower than the first batch
    picked = select_prompts(chosen, processor.tokenizer.pad_token_id)
    again = collate_prompts([samples[4], samples[0], samples[2]], [waves[4], waves[0], waves[2]], processor,
                            template=2)
    assert picked.keys() == again.keys()
    for key in again:
        assert picked[key].dtype == again[key].dtype, key
        assert torch.equal(picked[key], again[key]), key
    assert picked["input_ids"].shape[1] < first["input_ids"].shape[1]


@pytest.fixture(scope="module")
def omni_processor(tmp_path_factory):
    from models.loading import load_processor
    from models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-omni"), family="qwen2_5_omni", seed=0,
                                 corpus=synthetic_corpus(), audio_seconds=WINDOW_S)
    return load_processor(path)


@pytest.mark.parametrize("template", [1, 2, 3])
def test_qwen2_5_omni_prompts_carry_its_system_prompt_and_one_audio(omni_processor, template):
    """Qwen2.5-Omni's prompt: its own system turn, the audio as <|audio_bos|><|AUDIO|>...<|audio_eos|>
    (no "Audio 1:" label, no image or video), then R1-AQA's question text; prompt_length agrees."""
    from data.collate import prompt_length
    from models.omni import SYSTEM_PROMPT

    seconds = [0.5, 2.9]
    waves = [np.random.default_rng(i).standard_normal(int(s * SR)).astype(np.float32) * 0.1
             for i, s in enumerate(seconds)]
    samples = _samples(2)
    b = collate_prompts(samples, waves, omni_processor, template=template)
    tok = omni_processor.tokenizer
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")
    for i, (sample, wave) in enumerate(zip(samples, waves)):
        n = _expected_audio_tokens(len(wave))
        assert (b["input_ids"][i] == audio_id).sum() == n
        real = b["input_ids"][i, b["attention_mask"][i].bool()]
        assert len(real) == prompt_length(sample, len(wave), omni_processor, template=template)
        assert tok.decode(real) == (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|audio_bos|>" + "<|AUDIO|>" * n
            + "<|audio_eos|>" + format_prompt(sample.question, sample.choices, template)
            + "<|im_end|>\n<|im_start|>assistant\n")
