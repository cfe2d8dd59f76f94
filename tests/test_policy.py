import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import both_families
from models import omni
from models.policy import (completion_logprobs, embedding_inputs, generate, group_logprobs, prompt_embeddings,
                           set_trainable, suppressed_token_ids, text_decoder)
from models.sampling import row_seed

pytestmark = both_families  # every test here runs on the tiny Qwen2-Audio and the tiny Qwen2.5-Omni thinker

SR = 16000
G = 3


def tone(seconds, freq):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-t)).astype(np.float32)


@pytest.fixture
def batch(tiny_processor):
    """2 clips of different lengths, prompts of different lengths, left padded."""
    texts = ["What is it?", "Which tone is louder, the first or the second one? Answer in <answer> </answer>."]
    prompts = [tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    inputs = tiny_processor(text=prompts, audio=[tone(1.0, 440), tone(2.3, 880)], return_tensors="pt", padding=True,
                              sampling_rate=SR)
    assert inputs["attention_mask"][0, 0] == 0  # the first prompt really is left padded
    return dict(inputs)


def ids_of(processor, *tokens):
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def completions(processor, n_rows, T=7, seed=0):
    """[n_rows, T] ordinary tokens, each row ending (<|im_end|>, then pads) at a different length."""
    im_end, pad = ids_of(processor, "<|im_end|>", "<|endoftext|>")
    ids = torch.randint(0, 300, (n_rows, T), generator=torch.Generator().manual_seed(seed))
    for row in range(n_rows):
        end = 2 + row % (T - 2)
        ids[row, end], ids[row, end + 1:] = im_end, pad
    return ids


def reference_logprobs(model, batch, completion_ids, temperature):
    """The plain HF forward on G-times repeated inputs (features included), gathered at completion positions."""
    P, T = batch["input_ids"].shape[1], completion_ids.shape[1]
    rep = {k: v.repeat_interleave(G, dim=0) for k, v in batch.items()}
    input_ids = torch.cat([rep["input_ids"], completion_ids], dim=1)
    mask = torch.cat([rep["attention_mask"], torch.ones_like(completion_ids)], dim=1)
    logits = model(input_ids=input_ids, attention_mask=mask, input_features=rep["input_features"],
                   feature_attention_mask=rep["feature_attention_mask"]).logits[:, P - 1:P + T - 1]
    return F.log_softmax(logits / temperature, -1).gather(-1, completion_ids[..., None]).squeeze(-1)


def policy_logprobs(model, batch, completion_ids, temperature, shared=False, **kw):
    embeds = prompt_embeddings(model, batch["input_ids"], batch["input_features"], batch["feature_attention_mask"])
    if shared:  # each prompt once, its G completions packed after it
        return group_logprobs(model, embeds, batch["attention_mask"], completion_ids, temperature=temperature, **kw)
    return completion_logprobs(model, embeds.repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0),
                               completion_ids, temperature=temperature, **kw)


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "packed"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_grads_match_plain_forward(tiny_model, tiny_processor, batch, temperature, shared):
    """Against the stock forward of each unpacked sequence [q, o] (which computes its own
    positions: Qwen2.5-Omni's three-row M-RoPE ones via its get_rope_index)."""
    model = tiny_model
    completion_ids = completions(tiny_processor, 2 * G)
    weights = torch.randn(completion_ids.shape, generator=torch.Generator().manual_seed(1))
    set_trainable(model)  # everything the forward uses (not the thinker's vision encoder)
    params = [p for p in model.parameters() if p.requires_grad]

    ref = reference_logprobs(model, batch, completion_ids, temperature)
    ref_grads = torch.autograd.grad((ref * weights).sum(), params)
    ours = policy_logprobs(model, batch, completion_ids, temperature, shared=shared, chunk_size=5)
    grads = torch.autograd.grad((ours * weights).sum(), params)

    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for p, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in grads[:5])  # the audio encoder gets gradient


def test_encoder_runs_once_per_clip(tiny_model, batch):
    calls = []
    tower = omni.audio_tower(tiny_model) if omni.is_omni(tiny_model) else tiny_model.model.audio_tower
    tower.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
    prompt_embeddings(tiny_model, **embedding_inputs(batch))
    assert len(calls) == 1
    (args, kwargs), = calls
    if omni.is_omni(tiny_model):  # the clips' real frames, packed: B clips, not B * G
        assert kwargs["feature_lens"].tolist() == batch["feature_attention_mask"].sum(-1).tolist()
        assert args[0].shape[1] == batch["feature_attention_mask"].sum()
    else:
        assert args[0].shape[0] == 2  # B clips, not B * G


def test_audio_token_mismatch_is_a_clear_error(tiny_model, batch):
    ids = batch["input_ids"].clone()
    ids[0, -1] = tiny_model.config.audio_token_id  # one <|AUDIO|> too many
    with pytest.raises(ValueError, match="AUDIO"):
        prompt_embeddings(tiny_model, ids, batch["input_features"], batch["feature_attention_mask"])


def test_chunking_gives_identical_results_and_bounded_memory(tiny_model, tiny_processor, batch):
    completion_ids = completions(tiny_processor, 2 * G)
    N, T = completion_ids.shape
    V = tiny_model.config.text_config.vocab_size
    big, big_entropy = policy_logprobs(tiny_model, batch, completion_ids, 1.0, chunk_size=4096, with_entropy=True)

    # nothing vocabulary-wide with more than chunk_size rows is kept for backward
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.shape), t)[1], lambda t: t):
        small, small_entropy = policy_logprobs(tiny_model, batch, completion_ids, 1.0, chunk_size=4,
                                               with_entropy=True)
        small.sum().backward()
    assert max((s.numel() for s in saved if s[-1] == V and s.numel() > V), default=0) <= 4 * V < N * T * V

    torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(small_entropy, big_entropy, atol=1e-6, rtol=1e-6)
    assert (big_entropy > 0).all() and (big_entropy <= np.log(V) + 1e-4).all()


def test_set_trainable(tiny_model):
    total = sum(p.numel() for p in tiny_model.parameters())
    if omni.is_omni(tiny_model):  # the vision encoder and the talker's audio bos/eos embedding are never used
        tower, inner = omni.audio_tower(tiny_model), tiny_model.model
        visual = inner.visual if hasattr(inner, "visual") else tiny_model.visual
        never = sum(p.numel() for p in visual.parameters()) + tower.audio_bos_eos_token.weight.numel()
    else:
        tower = tiny_model.model.audio_tower
        never = tower.embed_positions.weight.numel()  # a fixed sinusoidal table
    assert set_trainable(tiny_model) == total - never
    n = set_trainable(tiny_model, audio_encoder=False, projector=False)
    assert not any(p.requires_grad for p in tower.parameters())
    assert n == sum(p.numel() for p in text_decoder(tiny_model).parameters()) + tiny_model.lm_head.weight.numel()
    assert set_trainable(tiny_model, audio_encoder=False, projector=False, decoder=False) == 0
    if omni.is_omni(tiny_model):  # the thinker's projector is the encoder's last layer
        assert set_trainable(tiny_model, audio_encoder=False, decoder=False) == \
            sum(p.numel() for p in tower.proj.parameters())


def test_suppressed_token_ids(tiny_processor):
    expected = ids_of(tiny_processor, "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>")
    vocab = tiny_processor.tokenizer.get_vocab()
    expected += [vocab[t] for t in omni.VISION_TOKENS if t in vocab]  # the thinker's only
    assert suppressed_token_ids(tiny_processor.tokenizer) == sorted(expected)
    assert suppressed_token_ids(tiny_processor, vocab_size=len(tiny_processor.tokenizer) + 2)[-2:] == \
        [len(tiny_processor.tokenizer), len(tiny_processor.tokenizer) + 1]


# --- generation ---------------------------------------------------------------------------------

def gen_inputs(model, batch):
    with torch.no_grad():
        embeds = prompt_embeddings(model, **embedding_inputs(batch))
    return embeds.repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0)


def gen_kwargs(processor, **kw):
    im_end, pad = ids_of(processor, "<|im_end|>", "<|endoftext|>")
    return {**dict(max_new_tokens=6, end_token_ids=[im_end, pad], pad_token_id=pad,
                   suppress_token_ids=suppressed_token_ids(processor)), **kw}


def bias_logits(model, token_ids, rows=None, amount=1e4):
    """Make `token_ids` the argmax of the lm_head output (for `rows`, default all)."""
    def hook(module, args, out):
        out = out.clone()
        index = (slice(None) if rows is None else rows, ..., token_ids)
        out[index] += amount
        return out
    return model.lm_head.register_forward_hook(hook)


def test_suppressed_tokens_are_never_produced(tiny_model, tiny_processor, batch):
    embeds, mask = gen_inputs(tiny_model, batch)
    audio, im_start = ids_of(tiny_processor, "<|AUDIO|>", "<|im_start|>")
    bias_logits(tiny_model, [audio, im_start])
    kw = gen_kwargs(tiny_processor)
    unguarded = generate(tiny_model, embeds, mask, **{**kw, "suppress_token_ids": []}, greedy=True)
    assert torch.isin(unguarded[:, 0], torch.tensor([audio, im_start])).all()  # the bias works
    suppressed = torch.tensor(kw["suppress_token_ids"])
    for greedy, top_k, top_p in ((True, 0, 1.0), (False, 0, 1.0), (False, 50, 0.9)):
        out = generate(tiny_model, embeds, mask, **kw, greedy=greedy, top_k=top_k, top_p=top_p,
                       temperature=1.5, generator=torch.Generator().manual_seed(0))
        assert not torch.isin(out, suppressed).any()


def test_padded_after_first_end_and_early_stop(tiny_model, tiny_processor, batch):
    embeds, mask = gen_inputs(tiny_model, batch)
    kw = gen_kwargs(tiny_processor)
    im_end, pad = kw["end_token_ids"]
    handle = bias_logits(tiny_model, [im_end], rows=[0, 3])
    out = generate(tiny_model, embeds, mask, **kw, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2 * G, 6)
    assert out[0].tolist() == [im_end] + [pad] * 5 and out[3].tolist() == [im_end] + [pad] * 5
    handle.remove()
    bias_logits(tiny_model, [im_end])  # every row ends at once: one step only
    assert generate(tiny_model, embeds, mask, **kw).tolist() == [[im_end]] * (2 * G)


def test_sampling_is_reproducible_and_ends_are_padded(tiny_model, tiny_processor, batch):
    embeds, mask = gen_inputs(tiny_model, batch)
    kw = gen_kwargs(tiny_processor, max_new_tokens=12, temperature=1.0, top_k=50)
    a = generate(tiny_model, embeds, mask, **kw, generator=torch.Generator().manual_seed(7))
    b = generate(tiny_model, embeds, mask, **kw, generator=torch.Generator().manual_seed(7))
    c = generate(tiny_model, embeds, mask, **kw, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a.tolist():  # pads only (and always) after the first end token
        ended = [i for i, t in enumerate(row) if t in kw["end_token_ids"]]
        if ended:
            assert all(t == kw["pad_token_id"] for t in row[ended[0] + 1:])


def test_greedy_matches_hf_generate(tiny_model, tiny_processor, batch):
    embeds, mask = gen_inputs(tiny_model, batch)
    kw = gen_kwargs(tiny_processor, max_new_tokens=5)
    ours = generate(tiny_model, embeds[::G], mask[::G], **kw, greedy=True)
    hf = tiny_model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=kw["end_token_ids"],
                             pad_token_id=kw["pad_token_id"], suppress_tokens=kw["suppress_token_ids"])
    hf = hf[:, batch["input_ids"].shape[1]:]
    assert torch.equal(ours, hf[:, :ours.shape[1]])


def test_shared_prefill_equals_prefilling_every_copy(tiny_model, tiny_processor, batch):
    """group_size=G prefills each prompt once and repeats its KV cache: the same completions
    as prefilling the G repeated copies (same per-row seeds)."""
    embeds, mask = gen_inputs(tiny_model, batch)  # [2*G, P, H]: each prompt already repeated G times
    kw = gen_kwargs(tiny_processor, max_new_tokens=10, temperature=1.0, top_k=50)
    seeds = torch.tensor([row_seed(0, i) for i in range(2 * G)])
    ids = generate(tiny_model, embeds, mask, **kw, row_seeds=seeds)
    ids_shared = generate(tiny_model, embeds[::G], mask[::G], **kw, row_seeds=seeds, group_size=G)
    assert torch.equal(ids, ids_shared)
    assert len(set(map(tuple, ids.tolist()))) > 1  # the G rows of a prompt did sample differently


def test_row_seeds_make_a_completion_independent_of_its_batch(tiny_model, tiny_processor, batch):
    """A completion depends on its seed and prompt only: generating prompt 1 alone gives the
    rows it got next to prompt 0 (what makes 1 rank and 2 ranks sample alike)."""
    embeds, mask = gen_inputs(tiny_model, batch)
    kw = gen_kwargs(tiny_processor, max_new_tokens=10, temperature=1.0, top_k=50)
    seeds = torch.tensor([row_seed(5, i) for i in range(2 * G)])
    both = generate(tiny_model, embeds[::G], mask[::G], **kw, row_seeds=seeds, group_size=G)
    # prompt 1 alone, without its left padding columns
    real = mask[G].bool()
    alone = generate(tiny_model, embeds[G:G + 1, real], mask[G:G + 1, real], **kw, row_seeds=seeds[G:], group_size=G)
    assert torch.equal(both[G:, :alone.shape[1]], alone)


def test_the_sampler_logprobs_are_the_loss_logprobs_of_the_same_tokens(tiny_model, tiny_processor, batch):
    """generate(return_logprobs=True) keeps log_softmax(logits / temperature) of each chosen
    token, over the whole vocabulary: in fp32 they equal the packed forward's log-probs of the
    same completions (the sampler/trainer gap is rounding only), filtering and suppression
    notwithstanding; scored at another temperature, the gap is plain to see."""
    from models.policy import group_logprobs

    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))  # [2, P, H]
    mask = batch["attention_mask"]
    kw = gen_kwargs(tiny_processor, max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9)
    seeds = torch.tensor([row_seed(3, i) for i in range(2 * G)])
    ids, sampled = generate(tiny_model, embeds, mask, **kw, row_seeds=seeds, group_size=G, return_logprobs=True)
    assert torch.equal(ids, generate(tiny_model, embeds, mask, **kw, row_seeds=seeds, group_size=G))  # same draw
    from grpo.algorithm import completion_mask

    real = completion_mask(ids, kw["end_token_ids"])  # [N, T] up to the end token
    assert (sampled[~real] == 0).all() and (sampled[real] < 0).all()
    with torch.no_grad():
        loss_side = group_logprobs(tiny_model, embeds, mask, ids, temperature=0.7)  # [N, T]
        other_temperature = group_logprobs(tiny_model, embeds, mask, ids, temperature=1.0)
    gap = (sampled - loss_side).abs()[real]
    assert gap.max() < 1e-5, gap.max()
    assert (sampled - other_temperature).abs()[real].mean() > 1e-2
