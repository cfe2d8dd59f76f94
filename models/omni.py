"""What is particular to Qwen2.5-Omni's thinker (Qwen2_5OmniThinkerForConditionalGeneration).

The thinker is the text-out half of Qwen2.5-Omni (the talker, which speaks, is never loaded):
a Whisper-style audio encoder, a vision encoder (never called here: prompts are audio and
text only) and a Qwen2.5 decoder with multimodal rotary positions. models.policy calls the
few functions here through small hooks; everything else (the packed group pass, the KV-cache
sampler, FSDP units, LoRA) is shared with Qwen2-Audio.

Where the thinker differs from Qwen2-Audio, and what this module does about it:

- **The audio encoder attends in windows.** Its input is the clip's real mel frames only
  (the feature extractor's padding is dropped before the encoder, as the stock
  ``get_audio_features`` does), cut into windows of ``2 * n_window`` frames (2 s for the
  real model). Each window is convolved, gets its own sinusoidal positions (restarting at 0)
  and attends only within itself. So a clip's features depend on the clip alone, never on
  the batch or the padding, and the encoder's cost grows linearly with the clip's length
  (attention within 2 s windows) instead of running the whole 30 s window as Qwen2-Audio's
  encoder does. There is no padded window to trim, so the ``real_frames`` switch has
  nothing to change for this family (the encoder always runs over the real frames only).
  There is no separate projector either: the encoder ends with its own ``proj``.
- **Rotary positions have three rows** (time, height, width: M-RoPE). For a prompt of audio
  and text only, the model's own ``get_rope_index`` gives the three rows equal, each the
  ordinary 0, 1, 2, ... over the real tokens (audio positions advance one per audio token
  like text; only audio *interleaved with video* gets time-aligned positions). A
  completion continues after the prompt (max position + 1, the "rope delta" being 0), so
  ``rope_positions`` repeats the shared 1-D positions on three rows; tests compare the
  result with the stock ``get_rope_index`` and with an unpacked full forward.
- **Module paths moved between transformers releases**: 5.24 has ``model.model.audio_tower``
  and ``model.model.language_model``; 5.17 has ``model.audio_tower`` and ``model.model`` (the
  decoder itself). ``audio_tower`` / ``text_decoder`` find either.
"""

from __future__ import annotations

import torch

MODEL_TYPE = "qwen2_5_omni_thinker"

# The system prompt Qwen2.5-Omni was trained with (its model card asks for it verbatim).
SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                 "perceiving auditory and visual inputs, as well as generating text and speech.")

# Qwen2.5-Omni's control tokens in the order of its vocabulary (151643 ... 151656).
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
                  "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>"]

# The tokenizer attributes Qwen2_5OmniProcessor reads (tokenizer.audio_token, ...).
TOKEN_ATTRIBUTES = {"audio_token": "<|AUDIO|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
                    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>"}

# Structural tokens of the vision side: never sampled (on top of models.policy.SUPPRESSED_TOKENS).
VISION_TOKENS = ("<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>")

# Qwen2.5-Omni's chat template (its chat_template.json): a default system line when the
# conversation has none, each audio as <|audio_bos|><|AUDIO|><|audio_eos|> (the processor
# expands <|AUDIO|> to one token per encoder output), images and videos likewise.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# transformers 5.24 renames the thinker's hub layout (audio_tower.*, visual.*, model.*) into its
# own tree on load; 5.17 uses the hub layout as is. Exports write the hub layout, which both read.
HUB_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)


def is_omni(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == MODEL_TYPE


def audio_tower(model):
    inner = model.model
    return inner.audio_tower if hasattr(inner, "audio_tower") else model.audio_tower


def text_decoder(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def audio_features(model, input_features, feature_attention_mask):
    """[sum of real positions, H] audio features of a batch of clips, in clip order, each clip
    through the encoder once, over its real mel frames only (see the module doc: windows).

    input_features [B, M, F] (padded to the window), feature_attention_mask [B, F]. The same
    steps as the stock ``get_audio_features``, calling the encoder module itself (so an FSDP
    unit's hooks run)."""
    tower = audio_tower(model)
    mask = feature_attention_mask.to(input_features.device).bool()  # [B, F]
    lengths = mask.sum(-1)  # [B] real mel frames
    packed = input_features.transpose(1, 2)[mask].T  # [M, sum(lengths)]: the real frames, clip after clip
    after_cnn, out_lengths = tower._get_feat_extract_output_lengths(lengths)
    out = tower(packed, feature_lens=lengths, aftercnn_lens=after_cnn)
    hidden = out.last_hidden_state  # [sum(out_lengths), H]
    if hidden.shape[0] != int(out_lengths.sum()):
        raise ValueError(f"the audio encoder gave {hidden.shape[0]} positions for {int(out_lengths.sum())} expected")
    return hidden


def rope_positions(positions):
    """[B, L] (or [N, 1]) 1-D positions -> [3, B, L] M-RoPE positions of an audio-and-text sequence.

    The three rows (time, height, width) are equal for such a sequence (module doc), so
    repeating the 1-D positions is exactly what ``get_rope_index`` computes."""
    return positions.unsqueeze(0).expand(3, *positions.shape)


def to_hub_key(name):
    for ours, hub in HUB_PREFIXES:
        if name.startswith(ours):
            return hub + name[len(ours):]
    return name


def set_trainable(model, *, audio_encoder, projector, decoder):
    """The thinker's part of models.policy.set_trainable: the projector is the encoder's
    final ``proj`` (trains with `projector` even when the encoder is frozen); the vision
    encoder is never called, so it never trains."""
    tower = audio_tower(model)
    tower.requires_grad_(audio_encoder)
    tower.proj.requires_grad_(projector)
    tower.audio_bos_eos_token.requires_grad_(False)  # not used by the thinker's forward
    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    visual.requires_grad_(False)
    text_decoder(model).requires_grad_(decoder)  # includes embed_tokens
    model.lm_head.requires_grad_(decoder)


def tiny_config(*, vocab_size, ids, audio_frames, text_hidden, text_layers, audio_hidden, audio_layers):
    """The tiny thinker's Qwen2_5OmniThinkerConfig: 4 heads (2 key/value heads), MLPs twice as
    wide as the model, M-RoPE sections that fill the head's rotary dimensions in the real
    model's proportions (16:24:24 of 64), a 1 s encoder window, a one-block vision encoder
    (present in every thinker, never called)."""
    from transformers import Qwen2_5OmniThinkerConfig

    head_dim = text_hidden // 4
    half = head_dim // 2
    time = max(1, half // 4)
    section = [time, (half - time) // 2, half - time - (half - time) // 2]
    audio_config = dict(
        num_mel_bins=128, d_model=audio_hidden, encoder_layers=audio_layers, encoder_attention_heads=4,
        encoder_ffn_dim=2 * audio_hidden, max_source_positions=audio_frames // 2, n_window=50,
        output_dim=text_hidden,
    )
    vision_config = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_hidden,
                         fullatt_block_indexes=[0])
    text_config = dict(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )
    return Qwen2_5OmniThinkerConfig(
        audio_config=audio_config, vision_config=vision_config, text_config=text_config,
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        tie_word_embeddings=False)


def processor(tokenizer, feature_extractor):
    """The thinker's processor for prompts of audio and text: Qwen2AudioProcessor over the
    thinker's tokenizer, feature extractor and chat template.

    For such prompts it computes exactly what Qwen2_5OmniProcessor computes: the Whisper
    features padded to the window with their feature_attention_mask, and each <|AUDIO|>
    expanded to ((frames - 1) // 2 + 1 - 2) // 2 + 1 tokens for a clip of `frames` real mel
    frames (the thinker's ``_get_feat_extract_output_lengths``). Qwen2_5OmniProcessor itself
    cannot be built without torchvision (its video processor needs it), which the project
    does not install: nothing here processes images or video."""
    from transformers import Qwen2AudioProcessor

    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
