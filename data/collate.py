"""Samples + waveforms -> model inputs, through the Qwen2-Audio processor passed in.

The processor expands each <|AUDIO|> into one token per encoder frame of *real* audio
(about 25 per second), so prompt lengths depend on the clip lengths; prompts are never cut
(cutting breaks the match between `<|AUDIO|>` tokens and audio features).
"""

import math

import torch

from data.prompts import answer_target, build_messages, format_prompt

IGNORE_INDEX = -100  # label value that cross-entropy skips


def prompt_texts(samples, processor, *, template):
    """The chat-templated prompt string of each sample, ending with the assistant header."""
    return [processor.apply_chat_template(build_messages(format_prompt(s.question, s.choices, template)),
                                          add_generation_prompt=True, tokenize=False)
            for s in samples]


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
    text = prompt_texts([sample], processor, template=template)[0]
    n_text = len(processor.tokenizer(text)["input_ids"])  # the <|AUDIO|> placeholder counts once
    fe = processor.feature_extractor
    frames = math.ceil(min(n_audio_samples, fe.n_samples) / fe.hop_length)
    return n_text - 1 + (((frames - 1) // 2 + 1) - 2) // 2 + 1


def collate_sft(samples, waveforms, processor, *, template, targets=None, sampling_rate=16000,
                end_text="<|im_end|>"):
    """Prompt + target for supervised fine-tuning, RIGHT padded, with `labels [B, L]` that are
    IGNORE_INDEX on prompt and padding positions.

    targets default to answer_target(sample.answer, template). The target is tokenized on its
    own, as the model would generate it after the prompt, and ends with `end_text` so the
    model learns to stop.
    """
    if targets is None:
        if any(s.answer is None for s in samples):
            raise ValueError("collate_sft needs answers (or explicit targets); a sample has answer=None")
        targets = [answer_target(s.answer, template) for s in samples]
    if len(targets) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(targets)} targets")
    batch = collate_prompts(samples, waveforms, processor, template=template, sampling_rate=sampling_rate)
    tok = processor.tokenizer
    rows, labs = [], []
    for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], targets):
        prompt = ids[mask.bool()]  # [P_i], drop the left padding
        tgt = torch.tensor(tok(target + end_text, add_special_tokens=False)["input_ids"], dtype=ids.dtype)
        rows.append(torch.cat([prompt, tgt]))
        labs.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), tgt]))
    B, L = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, L), tok.pad_token_id, dtype=rows[0].dtype)
    attention_mask = torch.zeros((B, L), dtype=batch["attention_mask"].dtype)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=rows[0].dtype)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        input_ids[i, :len(r)], attention_mask[i, :len(r)], labels[i, :len(r)] = r, 1, lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "input_features": batch["input_features"],
            "feature_attention_mask": batch["feature_attention_mask"]}
