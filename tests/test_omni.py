"""What is particular to Qwen2.5-Omni's thinker (models.omni): its three-row rotary positions
and its audio encoder's windows. Everything else runs through the model-facing tests of both
families (``both_families`` in tests/conftest.py)."""

import numpy as np
import pytest
import torch

from models import omni
from models.policy import decoder_positions, embedding_inputs, position_ids_from_mask, prompt_embeddings

SR = 16000


def tone(seconds, freq):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-t)).astype(np.float32)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    from models.loading import load_model, load_processor
    from models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("omni") / "ckpt", family="qwen2_5_omni", seed=0)
    return load_model(path).eval(), load_processor(path)


def batch_of(processor, seconds, texts):
    prompts = [processor.apply_chat_template(
        [{"role": "system", "content": omni.SYSTEM_PROMPT},
         {"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    waves = [tone(s, 300 + 200 * i) for i, s in enumerate(seconds)]
    return dict(processor(text=prompts, audio=waves, return_tensors="pt", padding=True, sampling_rate=SR))


def test_three_row_positions_equal_the_models_own_rope_index(thinker):
    """On real tokens, decoder_positions gives exactly what the thinker's get_rope_index
    computes for prompts of audio and text (three equal rows), left padding included, and the
    positions after the prompt continue at its max + 1 (a rope delta of 0)."""
    model, processor = thinker
    batch = batch_of(processor, [0.7, 2.6], ["Is it high?", "Which tone is louder, the first or the second?"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0  # left padded
    theirs, delta = model.get_rope_index(batch["input_ids"], attention_mask=mask,
                                         audio_seqlens=batch["feature_attention_mask"].sum(-1))
    ours = decoder_positions(model, position_ids_from_mask(mask))
    assert ours.shape == theirs.shape == (3, *mask.shape)
    real = mask.bool()
    for row in range(3):
        assert torch.equal(ours[row][real], theirs[row][real])
    assert (delta == 0).all()


def test_encoder_windows_make_a_clips_features_its_own(thinker):
    """The thinker's encoder attends within windows of 2 * n_window mel frames: a clip's first
    window gives the same features whether the clip goes on or not, and a clip's features do
    not depend on the other clips of the batch (Qwen2-Audio's encoder attends over the whole
    clip, so neither holds there)."""
    model, processor = thinker
    batch = batch_of(processor, [2.5, 1.3], ["a", "b"])
    frames, n_window = batch["input_features"], model.config.audio_config.n_window
    first = frames.clone()
    first[0, :, 2 * n_window:] = 0
    cut_mask = batch["feature_attention_mask"].clone()
    cut_mask[0, 2 * n_window:] = 0  # clip 0 ends after its first window
    with torch.no_grad():
        whole = omni.audio_features(model, frames, batch["feature_attention_mask"])
        cut = omni.audio_features(model, first, cut_mask)
        alone = omni.audio_features(model, frames[1:], batch["feature_attention_mask"][1:])
    per_window = n_window // 2  # conv2 halves, then the 2x pooling halves again
    torch.testing.assert_close(cut[:per_window], whole[:per_window], atol=1e-6, rtol=1e-6)
    assert cut.shape[0] == per_window + alone.shape[0]
    torch.testing.assert_close(alone, whole[-alone.shape[0]:], atol=1e-6, rtol=1e-6)


def test_prompt_embeddings_equal_the_stock_forwards(thinker):
    """The audio features scattered into the <|AUDIO|> slots are the stock forward's: the
    decoder's input embeddings are identical (hooked on the decoder)."""
    model, processor = thinker
    batch = batch_of(processor, [0.7, 2.6], ["Is it high?", "Which tone is louder?"])
    seen = []
    decoder = omni.text_decoder(model)
    decoder.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
        ours = prompt_embeddings(model, **embedding_inputs(batch))
    torch.testing.assert_close(ours, seen[0], atol=0, rtol=0)
