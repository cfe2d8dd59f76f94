"""Samples + waveforms -> model inputs, through the processor passed in.

A processor with a ``system_prompt`` (models.loading sets Qwen2.5-Omni's) puts that system
turn before every prompt; without one the chat template's default system line stays.

The processor expands each <|AUDIO|> into one token per encoder frame of *real* audio
(about 25 per second), so prompt lengths depend on the clip lengths; prompts are never cut
(cutting breaks the match between `<|AUDIO|>` tokens and audio features).
"""

import functools
import math

from data.prompts import build_messages, format_prompt


@functools.lru_cache(maxsize=16384)
def _chat_prompt(processor, text):
    # Rendering the chat template is a few hundred microseconds; a training run asks for the
    # same questions over and over (every epoch, every rollout round), so remember them.
    messages = build_messages(text, system=getattr(processor, "system_prompt", None))
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@functools.lru_cache(maxsize=16384)
def _token_count(processor, prompt):
    return len(processor.tokenizer(prompt)["input_ids"])


def prompt_texts(samples, processor, *, template):
    """The chat-templated prompt string of each sample, ending with the assistant header."""
    return [_chat_prompt(processor, format_prompt(s.question, s.choices, template)) for s in samples]


def collate_prompts(samples, waveforms, processor, *, template, sampling_rate=16000):
    """-> {input_ids [B, P], attention_mask [B, P]} LEFT padded (so every row's next token is
    at position P, as generation needs), {input_features [B, n_mels, frames],
    feature_attention_mask [B, frames]} from the feature extractor."""
    if len(samples) != len(waveforms):
        raise ValueError(f"{len(samples)} samples but {len(waveforms)} waveforms")
    texts = prompt_texts(samples, processor, template=template)
    batch = processor(text=texts, audio=list(waveforms), sampling_rate=sampling_rate,
                      return_tensors="pt", padding=True, padding_side="left")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}


def prompt_length(sample, n_audio_samples, processor, *, template):
    """Decoder tokens of ``sample``'s prompt (text + audio), exactly as collate_prompts builds
    it for a clip of ``n_audio_samples``, without running the feature extractor.

    The processor expands the one <|AUDIO|> of the text into one token per encoder frame of
    real audio: the clip (cut at the window) gives ceil(S / hop) mel frames, which the
    encoder's stride-2 convolution and the 2x pooling after it reduce to
    ((frames - 1) // 2 + 1 - 2) // 2 + 1 tokens (Qwen2AudioProcessor's own formula).
    """
    n_text = _token_count(processor, prompt_texts([sample], processor, template=template)[0])  # <|AUDIO|> once
    fe = processor.feature_extractor
    frames = math.ceil(min(n_audio_samples, fe.n_samples) / fe.hop_length)
    return n_text - 1 + (((frames - 1) // 2 + 1) - 2) // 2 + 1
