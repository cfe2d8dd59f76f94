import numpy as np
import torch
from safetensors.torch import load_file

from conftest import both_families
from models import omni
from models.tiny import build_tiny_checkpoint

SR = 16000


def tone(seconds, freq=440.0):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def conversation(text):
    return [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "text", "text": text}]}]


@both_families
def test_size_and_untied_head(tiny_model):
    assert sum(p.numel() for p in tiny_model.parameters()) < 1_000_000
    assert tiny_model.lm_head.weight.data_ptr() != tiny_model.get_input_embeddings().weight.data_ptr()


@both_families
def test_deterministic_from_seed(tiny_checkpoint, tmp_path):
    family = "qwen2_5_omni" if "omni" in (tiny_checkpoint / "config.json").read_text() else "qwen2_audio"
    ref = load_file(tiny_checkpoint / "model.safetensors")
    same = load_file(build_tiny_checkpoint(tmp_path / "a", family=family, seed=0) / "model.safetensors")
    other = load_file(build_tiny_checkpoint(tmp_path / "b", family=family, seed=1) / "model.safetensors")
    assert ref.keys() == same.keys() and all(torch.equal(ref[k], same[k]) for k in ref)
    head = "lm_head.weight" if family == "qwen2_5_omni" else "language_model.lm_head.weight"
    assert not torch.equal(ref[head], other[head])


def test_chat_template_matches_qwen2_audio_instruct(tiny_processor):
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is it?<|im_end|>\n"
                "<|im_start|>assistant\n")
    for render in (tiny_processor.apply_chat_template, tiny_processor.tokenizer.apply_chat_template):
        assert render(conversation("What is it?"), add_generation_prompt=True, tokenize=False) == expected
    two = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": [{"type": "audio", "audio_url": "a"}, {"type": "audio", "audio_url": "b"},
                                        {"type": "text", "text": "Same?"}]}]
    assert tiny_processor.apply_chat_template(two, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 2: <|audio_bos|><|AUDIO|><|audio_eos|>\nSame?<|im_end|>\n")


def test_chat_template_matches_qwen2_5_omni(tmp_path):
    from models.loading import load_processor

    processor = load_processor(build_tiny_checkpoint(tmp_path / "omni", family="qwen2_5_omni"))
    system = {"role": "system", "content": omni.SYSTEM_PROMPT}
    assert processor.apply_chat_template([system] + conversation("What is it?"), add_generation_prompt=True,
                                         tokenize=False) == (
        f"<|im_start|>system\n{omni.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    # without a system turn, the template's default line (as Qwen2.5-Omni's own)
    assert processor.apply_chat_template(conversation("Hi"), tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    tok = processor.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in omni.CONTROL_TOKENS] == \
        list(range(tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|endoftext|>") + 14))
    assert tok.audio_token == "<|AUDIO|>" and tok.image_token == "<|IMAGE|>"  # what Qwen2_5OmniProcessor reads


@both_families
def test_tokenizer_roundtrip_and_special_tokens(tiny_processor, tiny_model):
    tok = tiny_processor.tokenizer
    text = "Answer:\n<answer>a dog</answer>\n\n  tabs\tünïcødé 漢字 🎵 123 ['x', 'y']"
    assert tok.decode(tok(text)["input_ids"]) == text
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"):
        assert len(tok(special)["input_ids"]) == 1, special
    assert tok.convert_tokens_to_ids("<|AUDIO|>") == tiny_model.config.audio_token_id
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert len(tok) <= tiny_model.config.text_config.vocab_size


@both_families
def test_processor_audio_tokens_25_per_second(tiny_processor, tiny_model):
    prompt = tiny_processor.apply_chat_template(conversation("Hi"), add_generation_prompt=True, tokenize=False)
    audio_id = tiny_model.config.audio_token_id
    for seconds, n_tokens in ((1.0, 25), (2.0, 50), (5.0, 75)):  # 5 s is cut to the 3 s window
        inputs = tiny_processor(text=[prompt], audio=[tone(seconds)], return_tensors="pt", sampling_rate=SR)
        assert inputs["input_features"].shape == (1, 128, 300)
        assert int((inputs["input_ids"] == audio_id).sum()) == n_tokens


@both_families
def test_hf_forward_and_generate_end_to_end(tiny_processor, tiny_model):
    prompts = [tiny_processor.apply_chat_template(conversation(t), add_generation_prompt=True, tokenize=False)
               for t in ("What is it?", "Which tone is louder, the first or the second one?")]
    inputs = tiny_processor(text=prompts, audio=[tone(1.0), tone(2.3, 880)], return_tensors="pt", padding=True,
                            sampling_rate=SR)
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded
    logits = tiny_model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, tiny_model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    out = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=50)
    assert out.shape[0] == 2 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 4
