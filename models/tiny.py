"""A tiny random Qwen2-Audio checkpoint, built in code, for tests and CPU runs.

It is the real architecture (Qwen2AudioForConditionalGeneration) with small sizes, a byte-level
BPE tokenizer trained on a few sentences with the real model's special tokens, the real chat
template, a shorter audio window, and a generation config that ends on <|im_end|> or
<|endoftext|>. It is written as an ordinary checkpoint directory and loaded by models.loading
exactly like Qwen2-Audio-7B-Instruct.
"""

from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)

from models.loading import save_checkpoint

# Same order as the real vocabulary (151643.. in Qwen2-Audio): appended after the BPE tokens.
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# Qwen2-Audio-7B-Instruct's chat template (its chat_template.json); the `type == 'audio'` test is
# added so that {"type": "audio"} parts without an `audio`/`audio_url` key render the same way.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
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

# Qwen2's pre-tokenizer split (tokenization_qwen2.py): digits one by one, words, punctuation, spaces.
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                     r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

DEFAULT_CORPUS = [
    "What is the main sound source in the audio?",
    "Which animal makes the sound heard in the audio?",
    "What instrument is playing in the audio?",
    "How many times does the sound repeat?",
    "Is the pitch of the tone rising or falling?",
    "Which tone is louder, the first or the second?",
    "Please choose the answer from the following options: ['dog', 'cat', 'bird', 'car'].",
    "Please choose the answer from the following options: ['rising', 'falling', 'steady'].",
    "Please choose the answer from the following options: ['one', 'two', 'three', 'four'].",
    "Output the final answer in <answer> </answer>.",
    "Output the thinking process in <think> </think> and final answer in <answer> </answer>.",
    "<answer>dog</answer>", "<answer>cat</answer>", "<answer>bird</answer>", "<answer>car</answer>",
    "<answer>rising</answer>", "<answer>falling</answer>", "<answer>steady</answer>",
    "<answer>one</answer>", "<answer>two</answer>", "<answer>three</answer>", "<answer>four</answer>",
    "<think>The sound is high and short, so it is a bird.</think><answer>bird</answer>",
    "<think>I hear two beeps and then silence.</think>\n<answer>two</answer>",
    "The answer is the first option.",
    "The sound of a dog barking in the distance.",
    "A man is speaking while music plays in the background.",
    "A woman sings and a guitar plays a melody.",
    "A car engine starts and the traffic noise grows louder.",
    "Water flows and birds are chirping in the morning.",
    "The piano plays a slow song in a quiet room.",
    "Someone knocks on the door three times.",
    "The tone goes up, then it goes down again.",
    "0 1 2 3 4 5 6 7 8 9 10 20 30 40 50 100 1000",
    "first second third fourth fifth high low loud quiet fast slow long short",
    "yes no true false left right up down sound music speech noise silence",
    "audio video clip question answer options choose final thinking process",
    "You are a helpful assistant.",
]


def train_tokenizer(corpus, vocab_size):
    """Byte-level BPE (like Qwen2's) trained on `corpus`, special tokens appended after the merges."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # the 256-byte initial alphabet makes every string encodable, whatever the corpus
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(CONTROL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    return Qwen2Tokenizer(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left", model_max_length=32768,
                          chat_template=CHAT_TEMPLATE)


def tiny_config(*, vocab_size, audio_token_id, bos_id, eos_id, audio_frames, text_hidden, text_layers,
                audio_hidden, audio_layers):
    audio_config = dict(
        model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=audio_hidden, encoder_layers=audio_layers,
        encoder_attention_heads=4, encoder_ffn_dim=2 * audio_hidden,
        # the encoder checks mel frames == max_source_positions * conv1 stride (1) * conv2 stride (2)
        max_source_positions=audio_frames // 2,
    )
    text_config = dict(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=bos_id, eos_token_id=eos_id,
    )
    return Qwen2AudioConfig(audio_config=audio_config, text_config=text_config, audio_token_index=audio_token_id)


def build_tiny_checkpoint(out_dir, *, seed=0, corpus=None, audio_seconds=3.0, text_hidden=64, text_layers=2,
                          audio_hidden=64, audio_layers=2, vocab_size=512):
    """Write a tiny random Qwen2-Audio checkpoint to `out_dir` and return its Path.

    Deterministic from `seed` (weights) and `corpus` (tokenizer). `audio_seconds` is the audio
    window (the real model's is 30 s): clips are padded or cut to it.
    """
    if audio_seconds != int(audio_seconds) or audio_seconds <= 0:
        raise ValueError(f"audio_seconds must be a whole number of seconds, got {audio_seconds}")
    audio_seconds = int(audio_seconds)
    sampling_rate, hop_length = 16000, 160
    audio_frames = audio_seconds * sampling_rate // hop_length  # 100 mel frames per second

    tokenizer = train_tokenizer(DEFAULT_CORPUS if corpus is None else list(corpus), vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=sampling_rate, hop_length=hop_length, chunk_length=audio_seconds,
        n_fft=400, padding_value=0.0, return_attention_mask=True)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                    chat_template=CHAT_TEMPLATE)

    config = tiny_config(vocab_size=vocab_size, audio_token_id=ids["<|AUDIO|>"], bos_id=ids["<|endoftext|>"],
                         eos_id=ids["<|im_end|>"], audio_frames=audio_frames, text_hidden=text_hidden,
                         text_layers=text_layers, audio_hidden=audio_hidden, audio_layers=audio_layers)
    # random init from the seed, without disturbing the caller's RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2AudioForConditionalGeneration(config)

    generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
        max_new_tokens=256)
    return save_checkpoint(model, config, processor, generation_config, Path(out_dir))
