"""The static-cache decoder (models.decoding) against the dynamic one (transformers' growing cache):
the same tokens, greedy and sampled, and the same sampler log-probs within 1e-5 in fp32, with
the same counter-based row seeds, over many seeds, ragged ends and chunked generation, on both
families (the thinker's M-RoPE positions after the packed prompt included); and the static
decoder's own promises: buffers allocated once and written in place, ended rows dropped."""

import numpy as np
import pytest
import torch

from conftest import both_families
from grpo.rollout import SamplingSettings, sample_completions
from models import decoding
from models.policy import embedding_inputs, generate, prompt_embeddings, suppressed_token_ids, text_decoder
from models.sampling import row_seed

pytestmark = both_families

SR = 16000
G = 4


def tone(seconds, freq):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * np.exp(-t)).astype(np.float32)


@pytest.fixture
def batch(tiny_processor):
    """3 clips of different lengths, prompts of different lengths, left padded."""
    texts = ["What is it?", "Which tone is louder, the first or the second one? Answer in <answer> </answer>.",
             "How many?"]
    prompts = [tiny_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    inputs = tiny_processor(text=prompts, audio=[tone(1.0, 440), tone(2.3, 880), tone(0.6, 660)],
                            return_tensors="pt", padding=True, sampling_rate=SR)
    assert inputs["attention_mask"][0, 0] == 0  # really left padded
    return dict(inputs)


def settings(processor, **kw):
    tok = processor.tokenizer
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    return {**dict(max_new_tokens=12, end_token_ids=[im_end, pad], pad_token_id=pad,
                   suppress_token_ids=suppressed_token_ids(processor)), **kw}


def ragged_ends(model, end_id, modulus):
    """End a row wherever its most likely token is a multiple of `modulus`: a function of the
    row's own state (it follows the row when the batch is compacted), ends at spread lengths."""
    def hook(module, args, out):
        top = out.max(-1, keepdim=True)
        ending = top.indices % modulus == 0  # [n, 1, 1] or [n, 1]
        return torch.where(ending & (torch.arange(out.shape[-1]) == end_id), top.values + 1.0, out)
    return model.lm_head.register_forward_hook(hook)


def both_decoders(model, embeds, mask, kw):
    dynamic = generate(model, embeds, mask, **kw, decoder="dynamic", return_logprobs=True)
    static = generate(model, embeds, mask, **kw, decoder="static", return_logprobs=True)
    return dynamic, static


def assert_same(dynamic, static):
    (ids_d, lp_d), (ids_s, lp_s) = dynamic, static
    assert torch.equal(ids_d, ids_s)
    torch.testing.assert_close(lp_s, lp_d, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["greedy", "sampled", "filtered"])
def test_static_decoder_gives_the_dynamic_decoders_tokens_and_logprobs(tiny_model, tiny_processor, batch, mode):
    """Over 6 seeds, with rows ending at spread lengths (some never): identical tokens, and
    sampler log-probs within 1e-5."""
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))  # [3, P, H]
    mask = batch["attention_mask"]
    end_id = settings(tiny_processor)["end_token_ids"][0]
    sampling = {"greedy": dict(greedy=True), "sampled": dict(temperature=1.0),
                "filtered": dict(temperature=0.7, top_k=50, top_p=0.9)}[mode]
    widths, ended = set(), 0
    for seed in range(6):
        handle = ragged_ends(tiny_model, end_id, modulus=5 + seed % 3)
        seeds = torch.tensor([row_seed(seed, i) for i in range(3 * G)])
        kw = settings(tiny_processor, group_size=G, row_seeds=seeds, **sampling)
        dynamic, static = both_decoders(tiny_model, embeds, mask, kw)
        handle.remove()
        assert_same(dynamic, static)
        ids = dynamic[0]
        widths.add(ids.shape[1])
        ended += int(torch.isin(ids, torch.tensor([end_id])).any(-1).sum())
    assert ended > 0  # ragged ends really happened


def test_no_end_and_one_token(tiny_model, tiny_processor, batch):
    """Rows that never end (the full max_new_tokens), and max_new_tokens of 1 and 0."""
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
    mask = batch["attention_mask"]
    seeds = torch.tensor([row_seed(9, i) for i in range(3 * G)])
    for T in (0, 1, 9):
        kw = settings(tiny_processor, max_new_tokens=T, group_size=G, row_seeds=seeds)
        dynamic, static = both_decoders(tiny_model, embeds, mask, kw)
        assert dynamic[0].shape == static[0].shape == (3 * G, T)
        assert_same(dynamic, static)


def test_shared_generator_keeps_every_row(tiny_model, tiny_processor, batch):
    """With torch.multinomial and one generator a row's draw depends on the batch, so the static
    decoder keeps every row: the same draws as the dynamic loop from the same generator state."""
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
    mask = batch["attention_mask"]
    end_id = settings(tiny_processor)["end_token_ids"][0]
    handle = ragged_ends(tiny_model, end_id, modulus=4)
    out = []
    for decoder in ("dynamic", "static"):
        out.append(generate(tiny_model, embeds, mask, **settings(tiny_processor, group_size=G), decoder=decoder,
                            generator=torch.Generator().manual_seed(3), return_logprobs=True))
    handle.remove()
    assert_same(*out)


def test_chunked_generation_gives_the_unchunked_completions(tiny_model, tiny_processor, batch):
    """sample_completions in chunks of 1 and 2 prompts (static) = all at once (dynamic)."""
    s = SamplingSettings(**{k: v for k, v in settings(tiny_processor).items()}, temperature=1.0, top_k=50)
    end_id = s.end_token_ids[0]
    seeds = torch.tensor([row_seed(4, i) for i in range(3 * G)])
    handle = ragged_ends(tiny_model, end_id, modulus=6)
    whole = sample_completions(tiny_model, batch, s, group_size=G, chunk_prompts=3, row_seeds=seeds,
                               return_logprobs=True, decoder="dynamic")
    for chunk in (1, 2):
        parts = sample_completions(tiny_model, batch, s, group_size=G, chunk_prompts=chunk, row_seeds=seeds,
                                   return_logprobs=True)
        assert_same(whole, parts)
    handle.remove()


def test_buffers_are_allocated_once_and_written_in_place(tiny_model, tiny_processor, batch, monkeypatch):
    """Every decode step writes into the same buffers (no reallocation, no torch.cat), allocated
    for the whole rollout, while no row ends: prompt + max_new_tokens - 1 slots per row with G
    copies of the prompt, max_new_tokens - 1 with the prompt once per group."""
    pointers = []
    update = decoding.StaticKVCache.update

    def recording(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            pointers.append((self.keys[0].data_ptr(), tuple(self.keys[0].shape)))
        return update(self, key_states, value_states, layer_idx, *args, **kwargs)

    monkeypatch.setattr(decoding.StaticKVCache, "update", recording)
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
    kw = settings(tiny_processor, max_new_tokens=8, group_size=G, suppress_token_ids=[
        *suppressed_token_ids(tiny_processor), *settings(tiny_processor)["end_token_ids"]])  # no row can end
    P = batch["input_ids"].shape[1]
    for shared, slots in ((False, P + 8 - 1), (True, 8 - 1)):
        pointers.clear()
        ids = decoding.generate_static(tiny_model, embeds, batch["attention_mask"], **kw, greedy=True,
                                       shared_prompt=shared)
        assert ids.shape == (3 * G, 8)
        assert len(pointers) == 7 and len(set(pointers)) == 1
        assert pointers[0][1][0] == 3 * G and pointers[0][1][2] == slots


def test_ended_rows_do_no_more_work(tiny_model, tiny_processor, batch):
    """The decoder's batch shrinks as rows end: the rows it runs over are the unfinished ones."""
    end_id = settings(tiny_processor)["end_token_ids"][0]
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
    rows_per_step = []
    lm = text_decoder(tiny_model)
    hook = lm.register_forward_pre_hook(lambda m, args, kw: rows_per_step.append(kw["inputs_embeds"].shape[0]),
                                        with_kwargs=True)
    handle = ragged_ends(tiny_model, end_id, modulus=3)
    seeds = torch.tensor([row_seed(1, i) for i in range(3 * G)])
    ids = generate(tiny_model, embeds, batch["attention_mask"], **settings(tiny_processor, group_size=G),
                   row_seeds=seeds)
    hook.remove(), handle.remove()
    ended_at = [(row == end_id).nonzero()[0].item() if (row == end_id).any() else ids.shape[1] for row in ids]
    steps = rows_per_step[1:]  # after the prefill of the 3 prompts
    assert rows_per_step[0] == 3 and len(steps) == ids.shape[1] - 1
    # step t feeds the token drawn at t - 1: rows still open after drawing it
    for t, n in enumerate(steps):
        assert n == max(1, sum(e > t for e in ended_at)), (t, n, ended_at)
    assert min(steps) < 3 * G  # rows were really dropped


def test_g_copies_of_the_prompt_kv_give_the_same_as_one_per_group(tiny_model, tiny_processor, batch):
    """The static decoder with each prompt's KV repeated G times (no log-sum-exp combination)
    and with it once per group: both the dynamic loop's tokens and log-probs."""
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
    mask = batch["attention_mask"]
    end_id = settings(tiny_processor)["end_token_ids"][0]
    for seed in range(3):
        handle = ragged_ends(tiny_model, end_id, modulus=4 + seed)
        seeds = torch.tensor([row_seed(20 + seed, i) for i in range(3 * G)])
        kw = settings(tiny_processor, group_size=G, row_seeds=seeds, temperature=0.8, top_k=40, return_logprobs=True)
        dynamic = generate(tiny_model, embeds, mask, **kw, decoder="dynamic")
        for shared in (False, True):
            assert_same(dynamic, decoding.generate_static(tiny_model, embeds, mask, **kw, shared_prompt=shared))
        handle.remove()
