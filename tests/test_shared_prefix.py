"""The two exact savings of models.policy: the audio encoder over real frames only, and each
prompt through the decoder once per group. Both must give today's outputs and gradients."""

import numpy as np
import pytest
import torch

from conftest import FAMILIES, both_families
from models import omni
from models.loading import enable_activation_checkpointing, load_model, load_processor
from models.policy import (audio_features, completion_logprobs, embedding_inputs, group_logprobs, kept_frames,
                           prompt_embeddings, text_decoder)
from models.tiny import build_tiny_checkpoint

SR = 16000


def tone(seconds, freq, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def window30(tmp_path_factory):
    """A tiny Qwen2-Audio with the real model's 30 s window (3000 mel frames)."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("w30") / "ckpt", seed=1, audio_seconds=30)
    return path, load_processor(path)


@pytest.fixture(scope="module", params=FAMILIES)
def window30_both(request, tmp_path_factory):
    """A tiny checkpoint of each family with the real models' 30 s window."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("w30") / "ckpt", family=request.param, seed=1,
                                 audio_seconds=30)
    return path, load_processor(path)


def make_batch(processor, seconds, texts=None):
    texts = texts or [f"Question {i}: " + "which one is it? " * (i % 3) for i in range(len(seconds))]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "audio_url": "x"}, {"type": "text", "text": t}]}],
        add_generation_prompt=True, tokenize=False) for t in texts]
    waves = [tone(s, 200 + 150 * i, seed=i) for i, s in enumerate(seconds)]
    return dict(processor(text=prompts, audio=waves, return_tensors="pt", padding=True, sampling_rate=SR))


def ragged_completions(processor, n_rows, T, seed=0):
    """[n_rows, T] tokens; row r ends (<|im_end|>, then pads) at its own length, one never ends."""
    tok = processor.tokenizer
    im_end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.randint(0, 300, (n_rows, T), generator=torch.Generator().manual_seed(seed))
    for row in range(n_rows - 1):
        end = 1 + row % (T - 1)
        ids[row, end], ids[row, end + 1:] = im_end, pad
    return ids


def per_row_logprobs(model, batch, ids, G, **kw):
    """Today's path: the full 30 s window, the prompt repeated G times through the decoder."""
    embeds = prompt_embeddings(model, **embedding_inputs(batch), real_frames=False)
    return completion_logprobs(model, embeds.repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0),
                               ids, **kw)


def shared_logprobs(model, batch, ids, **kw):
    embeds = prompt_embeddings(model, **embedding_inputs(batch))  # [B, P, H]
    return group_logprobs(model, embeds, batch["attention_mask"], ids, **kw)


def parameter_groups(model):
    inner = model.model
    if omni.is_omni(model):
        tower, decoder = omni.audio_tower(model), text_decoder(model)
        return {
            "audio encoder": [p for n, p in tower.named_parameters() if not n.startswith(("proj.", "audio_bos"))],
            "projector": list(tower.proj.parameters()),  # the thinker's projector ends its encoder
            "decoder layers": list(decoder.layers.parameters()),
            "embeddings": [decoder.embed_tokens.weight],
            "lm_head": [model.lm_head.weight],
        }
    return {
        "audio encoder": list(inner.audio_tower.parameters()),
        "projector": list(inner.multi_modal_projector.parameters()),
        "decoder layers": list(inner.language_model.layers.parameters()),
        "embeddings": [inner.language_model.embed_tokens.weight],
        "lm_head": [model.lm_head.weight],
    }


def test_kept_frames_covers_the_convolutions_margin():
    assert kept_frames(torch.tensor([50, 1000]), 3000) == 1002
    assert kept_frames(torch.tensor([999]), 3000) == 1002  # 1001, made even
    assert kept_frames(torch.tensor([3000]), 3000) == 3000


@pytest.mark.parametrize("seconds", [[0.5], [0.5, 30.0], [0.5, 3.7, 10.0, 29.99], [7.3, 10.0]])
def test_encoder_over_real_frames_equals_the_full_window(window30, seconds):
    path, processor = window30
    model = load_model(path, dtype=torch.float32).eval()
    batch = make_batch(processor, seconds)
    seen = []
    model.model.audio_tower.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    dtype = torch.float32
    full, lengths = audio_features(model, batch["input_features"], batch["feature_attention_mask"], dtype,
                                   real_frames=False)
    cut, cut_lengths = audio_features(model, batch["input_features"], batch["feature_attention_mask"], dtype)
    assert torch.equal(lengths, cut_lengths)
    longest = int(batch["feature_attention_mask"].sum(-1).max())
    assert seen == [3000, min(3000, longest + 2 + longest % 2)]  # the cut path saw only the frames it needs
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(cut[b, :n], full[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_logprobs_and_gradients_equal_the_per_row_path(window30_both, attn):
    """Left padding, clips of 0.5 s to 30 s in one batch, ragged completions with end tokens."""
    path, processor = window30_both
    G, T = 3, 6
    batch = make_batch(processor, [0.5, 30.0, 10.0])
    assert batch["attention_mask"][:, 0].min() == 0  # some prompt is left padded
    ids = ragged_completions(processor, 3 * G, T)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3))
    results = []
    for fn in (per_row_logprobs, None):
        model = load_model(path, dtype=torch.float32, attn_implementation=attn).eval()
        if fn is None:
            logp, entropy = shared_logprobs(model, batch, ids, temperature=0.7, chunk_size=5, with_entropy=True)
        else:
            logp, entropy = fn(model, batch, ids, G, temperature=0.7, chunk_size=5, with_entropy=True)
        (logp * weights).sum().backward()
        grads = {k: torch.cat([p.grad.flatten() for p in ps if p.grad is not None])
                 for k, ps in parameter_groups(model).items()}
        results.append((logp.detach(), entropy, grads))
    (ref, ref_entropy, ref_grads), (ours, entropy, grads) = results
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        r = ref_grads[name]
        assert r.norm() > 0, name
        assert (g - r).norm() / r.norm() < 1e-4, name


@both_families
def test_shared_prefix_with_activation_checkpointing_and_training_mode(tiny_checkpoint, tiny_processor):
    G = 4
    batch = make_batch(tiny_processor, [1.0, 2.5])
    ids = ragged_completions(tiny_processor, 2 * G, 5, seed=1)
    grads = []
    for shared in (False, True):
        model = load_model(tiny_checkpoint, dtype=torch.float32)
        enable_activation_checkpointing(model)
        model.train()
        logp = shared_logprobs(model, batch, ids) if shared else per_row_logprobs(model, batch, ids, G)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-4


@both_families
def test_shared_prefix_in_bfloat16_stays_close(tiny_checkpoint, tiny_processor):
    G = 2
    batch = make_batch(tiny_processor, [1.0, 2.0])
    ids = ragged_completions(tiny_processor, 2 * G, 5, seed=2)
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours, ref = shared_logprobs(model, batch, ids), per_row_logprobs(model, batch, ids, G)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=0.1, rtol=0.05)  # bf16 rounding of different summations


@both_families
def test_an_attention_without_4d_masks_falls_back_to_the_per_row_path(tiny_model, tiny_processor, monkeypatch):
    """flash_attention_2 takes no 4-D mask: it must get G rows per prompt, not the block mask."""
    import models.policy as policy

    G = 2
    batch = make_batch(tiny_processor, [1.0, 2.0])
    ids = ragged_completions(tiny_processor, 2 * G, 4)
    calls = []
    monkeypatch.setattr(policy, "completion_logprobs", lambda model, embeds, mask, ids, **kw: calls.append(
        (embeds.shape[0], mask.shape[0], ids.shape[0])) or "per-row")
    monkeypatch.setattr(text_decoder(tiny_model).config, "_attn_implementation", "flash_attention_2")
    with torch.no_grad():
        embeds = prompt_embeddings(tiny_model, **embedding_inputs(batch))
        assert policy.group_logprobs(tiny_model, embeds, batch["attention_mask"], ids) == "per-row"
    assert calls == [(2 * G, 2 * G, 2 * G)]


def test_the_entry_point_in_micro_batches_gives_each_prompts_own_scores(tiny_model, tiny_processor):
    """policy_logprobs(micro_batch_prompts=m): each slice of m prompts with its G completions
    scored alone, concatenated in order: the same log-probs and entropies as one pass over
    the batch (up to the rounding of other batch shapes), and as each prompt's own pass."""
    from models.policy import policy_logprobs

    G = 2
    batch = make_batch(tiny_processor, [1.0, 2.5, 0.5])
    ids = ragged_completions(tiny_processor, 3 * G, 5, seed=3)
    with torch.no_grad():
        whole, whole_entropy = policy_logprobs(tiny_model, batch, ids, with_entropy=True)
        parts, parts_entropy = policy_logprobs(tiny_model, batch, ids, with_entropy=True, micro_batch_prompts=2)
        alone = policy_logprobs(tiny_model, {k: v[2:3] for k, v in batch.items()}, ids[4:6])
    assert parts.shape == whole.shape == (3 * G, 5)
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts_entropy, whole_entropy, atol=1e-5, rtol=1e-5)
    assert torch.equal(parts[4:6], alone), "the last micro-batch is that prompt's own pass"
