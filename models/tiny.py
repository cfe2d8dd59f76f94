"""Tiny random checkpoints of both model families, built in code, for tests and CPU runs.

``build_tiny_checkpoint(out_dir, family=...)`` writes the real architecture
(Qwen2AudioForConditionalGeneration for ``qwen2_audio``, Qwen2.5-Omni's thinker
Qwen2_5OmniThinkerForConditionalGeneration for ``qwen2_5_omni``) with small sizes, a
byte-level BPE tokenizer trained on a few sentences with the real model's special tokens, the
real chat template, a shorter audio window, and a generation config that ends on <|im_end|>
or <|endoftext|>. It is written as an ordinary checkpoint directory and loaded by
models.loading exactly like Qwen2-Audio-7B-Instruct or Qwen2.5-Omni-7B's thinker.

``build_slice_checkpoint`` builds a slice of Qwen2-Audio-7B-Instruct the same way: every width,
head count, vocabulary size, mel-bin count and special-token id of the real model (its
architecture passed in, e.g. configs/qwen2_audio_7b_random.yaml), but only a few decoder and
encoder layers, random weights; the tokenizer's control tokens sit at the real ids
(<|endoftext|> 151643 ... <|audio_eos|> 151648), after reserved filler entries.
"""

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioProcessor,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)

from models import omni
from models.loading import model_class, save_checkpoint, save_processor

FAMILIES = ("qwen2_audio", "qwen2_5_omni")

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


def train_tokenizer(corpus, vocab_size, *, first_control_id=None, control_tokens=CONTROL_TOKENS,
                    chat_template=CHAT_TEMPLATE, extra_special_tokens=None):
    """Byte-level BPE (like Qwen2's) trained on `corpus`, special tokens appended after the merges.

    With `first_control_id`, the BPE vocabulary is filled up to that id with reserved entries
    (``<|reserved_i|>``: never produced by encoding, decoded as their text), so the control
    tokens get the real model's ids (151643.. for Qwen2) whatever the corpus.
    `control_tokens` and `chat_template`: the family's (Qwen2-Audio's by default);
    `extra_special_tokens`: tokenizer attributes naming special tokens (Omni's processor reads
    ``tokenizer.audio_token`` and the like)."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # the 256-byte initial alphabet makes every string encodable, whatever the corpus
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(control_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    if first_control_id is not None:
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]  # token -> id, ids 0..n-1
        if len(vocab) > first_control_id:
            raise ValueError(f"the BPE vocabulary ({len(vocab)}) is past first_control_id={first_control_id}")
        vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), first_control_id)})
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control_tokens])
    extra = {"extra_special_tokens": dict(extra_special_tokens)} if extra_special_tokens else {}
    return Qwen2Tokenizer(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", padding_side="left", model_max_length=32768,
                          chat_template=chat_template, **extra)


def tiny_config(*, vocab_size, audio_token_id, bos_id, eos_id, audio_frames, text_hidden, text_layers,
                audio_hidden, audio_layers):
    """The tiny model's Qwen2AudioConfig: 4 heads (2 key/value heads), MLPs twice as wide as the model."""
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


def slice_config(arch: dict, *, text_layers, audio_layers):
    """Qwen2AudioConfig of `arch` (the dict of configs/qwen2_audio_7b_random.yaml: text_config,
    audio_config, audio_token_id) with only `text_layers` decoder and `audio_layers` encoder layers."""
    return Qwen2AudioConfig(audio_config={**arch["audio_config"], "encoder_layers": audio_layers},
                            text_config={**arch["text_config"], "num_hidden_layers": text_layers},
                            audio_token_index=arch["audio_token_id"])


def build_tiny_checkpoint(out_dir, *, family="qwen2_audio", seed=0, corpus=None, audio_seconds=3.0, text_hidden=64,
                          text_layers=2, audio_hidden=64, audio_layers=2, vocab_size=512):
    """Write a tiny random checkpoint of `family` (``qwen2_audio`` or ``qwen2_5_omni``, the
    thinker) to `out_dir` and return its Path.

    Deterministic from `seed` (weights) and `corpus` (tokenizer). `audio_seconds` is the audio
    window (the real models' is 30 s): clips are padded or cut to it.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if audio_seconds != int(audio_seconds) or audio_seconds <= 0:
        raise ValueError(f"audio_seconds must be a whole number of seconds, got {audio_seconds}")
    audio_seconds = int(audio_seconds)
    audio_frames = audio_seconds * 100  # 100 mel frames per second (16 kHz, hop 160)
    corpus = DEFAULT_CORPUS if corpus is None else list(corpus)
    sizes = dict(text_hidden=text_hidden, text_layers=text_layers, audio_hidden=audio_hidden,
                 audio_layers=audio_layers, audio_frames=audio_frames)

    if family == "qwen2_5_omni":
        tokenizer = train_tokenizer(corpus + [omni.SYSTEM_PROMPT], vocab_size, control_tokens=omni.CONTROL_TOKENS,
                                    chat_template=omni.CHAT_TEMPLATE, extra_special_tokens=omni.TOKEN_ATTRIBUTES)
    else:
        tokenizer = train_tokenizer(corpus, vocab_size)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    if family == "qwen2_5_omni":
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in omni.CONTROL_TOKENS}
        config = omni.tiny_config(vocab_size=vocab_size, ids=ids, **sizes)
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
        config = tiny_config(vocab_size=vocab_size, audio_token_id=ids["<|AUDIO|>"], bos_id=ids["<|endoftext|>"],
                             eos_id=ids["<|im_end|>"], **sizes)
    return _write_random_checkpoint(out_dir, config, tokenizer, audio_seconds, seed=seed)


def build_slice_checkpoint(out_dir, arch: dict, *, text_layers=1, audio_layers=1, seed=0, dtype=torch.bfloat16,
                           corpus=None, weights=True):
    """Write a slice of the architecture `arch` (configs/qwen2_audio_7b_random.yaml's dict) to
    `out_dir`: its widths, heads, vocabulary, mel bins, audio window and special-token ids, with
    `text_layers` decoder and `audio_layers` encoder layers, random weights stored in `dtype`
    (initialised in it: no fp32 copy of the 1.3B embedding and output weights is ever made).
    `weights=False`: the configs and the processor only (for `random_model` to fill in)."""
    specials = arch["special_tokens"]
    names = dict(zip(CONTROL_TOKENS, ("endoftext", "im_start", "im_end", "audio", "audio_bos", "audio_eos")))
    first = specials["endoftext"]
    tokenizer = train_tokenizer(DEFAULT_CORPUS if corpus is None else list(corpus), 1024, first_control_id=first)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
    wrong = {t: (ids[t], specials[names[t]]) for t in CONTROL_TOKENS if ids[t] != specials[names[t]]}
    if wrong:
        raise ValueError(f"control token ids (got, wanted) differ from the architecture's: {wrong}")
    config = slice_config(arch, text_layers=text_layers, audio_layers=audio_layers)
    window = 2 * config.audio_config.max_source_positions // 100  # mel frames -> seconds (100 frames per second)
    return _write_random_checkpoint(out_dir, config, tokenizer, window, seed=seed, dtype=dtype, fast_init=True,
                                    weights=weights)


def random_model(config, *, seed=0, dtype=torch.bfloat16, device="cpu"):
    """Qwen2AudioForConditionalGeneration of `config` with random weights (`_fast_random_model`),
    built in `dtype` directly on `device` (seconds for the 7B on a GPU), deterministic from `seed`."""
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                return _fast_random_model(config)
        finally:
            torch.set_default_dtype(default)


def _normal_(weight: torch.Tensor, std: float, rows_per_chunk: int = 4096) -> None:
    """weight ~ N(0, std^2), drawn in fp32 a block of rows at a time and cast (the CPU's normal_
    in bf16 is ~30x slower than in fp32; a whole fp32 copy of a [156032, 4096] matrix is 2.6 GB)."""
    flat = weight.view(weight.shape[0], -1)
    for start in range(0, flat.shape[0], rows_per_chunk):
        block = flat[start:start + rows_per_chunk]
        block.copy_(torch.empty(block.shape, dtype=torch.float32).normal_(0.0, std))


def _fast_random_model(config) -> torch.nn.Module:
    """The model of `config` in the default dtype, initialised as transformers does by default
    (linear, convolution and embedding weights N(0, 0.02^2), biases 0, norms' weights 1) without
    transformers' per-module init, whose bf16 draws take minutes at the 7B's vocabulary."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = model_class(config)(config)
    std = getattr(config, "initializer_range", None) or 0.02
    done = set()
    with torch.no_grad():
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Embedding)):
                _normal_(weight, std)
            elif isinstance(weight, torch.nn.Parameter):  # RMSNorm, LayerNorm
                weight.fill_(1.0)
            if isinstance(bias, torch.nn.Parameter):
                bias.zero_()
            done |= {id(p) for p in (weight, bias) if isinstance(p, torch.nn.Parameter)}
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:  # left uninitialised: arbitrary memory
        raise RuntimeError(f"_fast_random_model does not know how to initialise {missed[:5]}")
    return model


def _write_random_checkpoint(out_dir, config, tokenizer, audio_seconds: int, *, seed, dtype=torch.float32,
                             fast_init=False, weights=True):
    """A checkpoint directory of `config` with random weights (from `seed`, in `dtype`), the
    processor (`tokenizer` + a Whisper feature extractor of an `audio_seconds` window, the chat
    template) and a generation config that ends on <|im_end|> or <|endoftext|>."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.audio_config.num_mel_bins, sampling_rate=16000, hop_length=160,
        chunk_length=audio_seconds, n_fft=400, padding_value=0.0, return_attention_mask=True)
    if omni.is_omni(config):
        processor = omni.processor(tokenizer, feature_extractor)
    else:
        processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer,
                                        chat_template=CHAT_TEMPLATE)
    generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], do_sample=True, temperature=1.0, top_k=50, top_p=1.0,
        max_new_tokens=256)
    if not weights:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        generation_config.save_pretrained(out)
        save_processor(processor, out)
        return out
    if fast_init:
        model = random_model(config, seed=seed, dtype=dtype)
    else:  # random init from the seed, without disturbing the caller's RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(config)(config)
    return save_checkpoint(model, config, processor, generation_config, Path(out_dir))
