"""The policy forward used by rollout and training: prompt embeddings, completion log-probs, sampling.

Why not the plain `model(**inputs)`: it runs every clip's features through the audio encoder
once per completion (G times), and computes logits for every prompt position over the whole
vocabulary. Here each clip goes through the encoder once, its prompt embeddings are repeated
for the G completions, and logits are computed only where a completion token is predicted,
in chunks of rows, so no [N, T, V] fp32 tensor is ever held in forward or backward.

Submodules called directly (models.distributed shards each of these as its own unit; nothing
else of the model is called from here):
    model.model.audio_tower             the Whisper-style encoder            (prompt_embeddings)
    model.model.multi_modal_projector   audio features -> text hidden size   (prompt_embeddings)
    model.get_input_embeddings()        = model.model.language_model.embed_tokens
    model.model.language_model          the Qwen2 decoder, called with inputs_embeds
    model.lm_head                       hidden -> vocabulary logits (once per row chunk)

Shapes: B prompts, G completions per prompt, N = B * G rows, P prompt length (left padded),
T completion length, H hidden size, V vocabulary size.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_bidirectional_mask

from models.sampling import gumbel_sample

# Structural tokens that must never be sampled: a sampled <|AUDIO|> breaks the next forward
# ("Audio features and audio tokens do not match"), the others open turns or audio spans.
SUPPRESSED_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>")


def audio_output_lengths(feature_lengths):
    """Mel frames -> (lengths after conv2, lengths after the encoder's 2x average pooling).

    The same arithmetic as Qwen2AudioEncoder._get_feat_extract_output_lengths."""
    conv = (feature_lengths - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def prompt_embeddings(model, input_ids, attention_mask, input_features, feature_attention_mask):
    """[B, P, H] prompt embeddings: text embeddings with each clip's audio features scattered
    into its <|AUDIO|> positions, exactly as Qwen2AudioModel.forward does, each clip through the
    encoder once. `attention_mask` is not needed (the decoder gets it later); kept for symmetry.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, P, H]
    if input_features is None:
        return embeds
    inner = model.model
    tower = inner.audio_tower
    feature_attention_mask = feature_attention_mask.to(input_features.device)
    conv_lengths, out_lengths = audio_output_lengths(feature_attention_mask.sum(-1))  # [B], [B]

    # the encoder attends (bidirectionally) only to the real frames of each clip
    B, _, n_frames = input_features.shape
    S = (n_frames - 2) // 2 + 1  # positions after conv2
    frame_mask = (torch.arange(S, device=conv_lengths.device)[None, :] < conv_lengths[:, None]).long()  # [B, S]
    dummy = torch.zeros(B, S, 1, dtype=embeds.dtype, device=embeds.device)
    encoder_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=frame_mask)
    hidden = tower(input_features, attention_mask=encoder_mask).last_hidden_state  # [B, S/2, Ha]
    audio = inner.multi_modal_projector(hidden)  # [B, S/2, H]

    # keep only positions of real audio, in clip order, then fill the <|AUDIO|> slots in order
    keep = torch.arange(audio.shape[1], device=audio.device)[None, :] < out_lengths.to(audio.device)[:, None]
    audio = audio[keep]  # [sum(out_lengths), H]
    slots = input_ids == inner.config.audio_token_id  # [B, P]
    n_slots, n_audio = int(slots.sum()), audio.shape[0]
    if n_slots != n_audio:
        raise ValueError(f"prompt has {n_slots} <|AUDIO|> tokens but the clips give {n_audio} audio features "
                         "(was the prompt cut, or not expanded by the processor?)")
    return embeds.masked_scatter(slots.unsqueeze(-1), audio.to(embeds.dtype))


def position_ids_from_mask(mask):
    """Positions that skip left padding: 0 at each row's first real token (as HF generate does)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _token_stats(lm_head, hidden, ids, temperature, with_entropy):
    """One chunk: hidden [n, H], ids [n] -> logp [n] (and detached entropy [n]) under logits / temperature."""
    logp = F.log_softmax(lm_head(hidden).float() / temperature, dim=-1)  # [n, V] fp32, this chunk only
    token_logp = logp.gather(-1, ids[:, None]).squeeze(-1)
    if not with_entropy:
        return token_logp
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy


def completion_logprobs(model, prompt_embeds, prompt_mask, completion_ids, *, temperature=1.0, chunk_size=1024,
                        with_entropy=False):
    """log pi(o_t | prompt, o_<t) for every completion token: [N, T] (and entropy [N, T], detached).

    prompt_embeds [N, P, H] (left padded), prompt_mask [N, P], completion_ids [N, T].
    Tokens after a completion's end are scored too; the caller masks them.
    """
    N, P, _ = prompt_embeds.shape
    T = completion_ids.shape[1]
    completion_embeds = model.get_input_embeddings()(completion_ids)  # [N, T, H]
    embeds = torch.cat([prompt_embeds, completion_embeds.to(prompt_embeds.dtype)], dim=1)  # [N, P+T, H]
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(N, T, dtype=torch.long)], dim=1)  # [N, P+T]
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask), use_cache=False)
    # position P-1+t predicts completion token t
    hidden = out.last_hidden_state[:, P - 1:P + T - 1].reshape(N * T, -1)  # [N*T, H]
    ids = completion_ids.reshape(N * T)

    # lm_head + log_softmax per chunk of rows; under grad, each chunk is recomputed in backward
    # (checkpoint) so the [chunk, V] logits are the only vocabulary-wide tensor alive at a time
    results = []
    for start in range(0, N * T, chunk_size):
        args = (model.lm_head, hidden[start:start + chunk_size], ids[start:start + chunk_size],
                temperature, with_entropy)
        if torch.is_grad_enabled():
            results.append(checkpoint(_token_stats, *args, use_reentrant=False))
        else:
            results.append(_token_stats(*args))
    if not with_entropy:
        return torch.cat(results).view(N, T)
    logp, entropy = zip(*results)
    return torch.cat(logp).view(N, T), torch.cat(entropy).view(N, T)


def filter_logits(logits, *, top_k=0, top_p=1.0):
    """Top-k, then nucleus (top-p) filtering of [N, V] logits: removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens more likely than it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _all_ranks_done(done, sync_ranks):
    if sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        # every rank runs the same number of decoder steps, or the sharded forward would hang
        flag = done.all().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return bool(done.all())


@torch.no_grad()
def generate(model, prompt_embeds, prompt_mask, *, max_new_tokens, end_token_ids, pad_token_id, suppress_token_ids,
             temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None, row_seeds=None,
             sync_ranks=False, group_size=1):
    """Sample completions with a KV cache: [N, T <= max_new_tokens] ids, `pad_token_id` after the first end token.

    With `group_size` G > 1, prompt_embeds [B, P, H] and prompt_mask [B, P] hold each prompt
    once: the prompt is prefilled once and its KV cache repeated G times, so N = B * G rows
    (row i * G + g is completion g of prompt i) without G prefills of the same prompt.

    Suppressed ids get -inf before temperature, top-k and top-p, so they are never produced.
    With `row_seeds` ([N] int64), row n's token at step t is a pure function of
    (row_seeds[n], t) and its logits (counter-based Gumbel-max, models.sampling), so the
    draw does not depend on the batch, the chunking or the rank; else torch.multinomial
    with `generator`.
    """
    lm, embed = model.model.language_model, model.get_input_embeddings()
    device = prompt_embeds.device
    mask = prompt_mask.long()  # [B, P]
    ends = torch.as_tensor(list(end_token_ids), device=device, dtype=torch.long)
    suppress = torch.as_tensor(list(suppress_token_ids), device=device, dtype=torch.long)

    # prefill each prompt once; the hidden state of the last prompt position predicts the first token
    out = lm(inputs_embeds=prompt_embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
             use_cache=True)
    cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]  # hidden [B, H]
    if group_size > 1:  # the G completions of a prompt share its prefill
        cache.batch_repeat_interleave(group_size)
        hidden = hidden.repeat_interleave(group_size, dim=0)  # [N, H]
        mask = mask.repeat_interleave(group_size, dim=0)  # [N, P], grows by one column per step
    N = hidden.shape[0]
    position = mask.sum(-1, keepdim=True)  # [N, 1]: position of the first new token
    done = torch.zeros(N, dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        logits = model.lm_head(hidden).float()  # [N, V]
        if suppress.numel():
            logits[:, suppress] = float("-inf")
        if greedy:
            token = logits.argmax(-1)
        else:
            logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
            if row_seeds is not None:
                token = gumbel_sample(logits, row_seeds.to(device), step)
            else:
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(done, pad_token_id)  # [N]
        tokens.append(token)
        done = done | torch.isin(token, ends)
        if step == max_new_tokens - 1 or _all_ranks_done(done, sync_ranks):
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
        out = lm(inputs_embeds=embed(token[:, None]), attention_mask=mask, position_ids=position,
                 past_key_values=cache, use_cache=True)
        cache, hidden = out.past_key_values, out.last_hidden_state[:, -1]
        position = position + 1
    if not tokens:  # max_new_tokens == 0
        return torch.empty(N, 0, dtype=torch.long, device=device)
    return torch.stack(tokens, dim=1)  # [N, T]


def suppressed_token_ids(tokenizer, *, vocab_size=None):
    """Ids of <|AUDIO|>, <|audio_bos|>, <|audio_eos|>, <|im_start|> (those in the vocabulary).

    With `vocab_size` (the model's, often padded beyond the tokenizer), also every id the
    tokenizer does not have, which it could not decode.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in SUPPRESSED_TOKENS if t in vocab]
    if vocab_size is not None:
        known = set(vocab.values())
        ids += [i for i in range(vocab_size) if i not in known]
    return sorted(set(ids))


def set_trainable(model, *, audio_encoder=True, projector=True, decoder=True):
    """Choose what trains; decoder = language model + input embeddings + lm_head. Returns #trainable params."""
    inner = model.model
    inner.audio_tower.requires_grad_(audio_encoder)
    # the encoder's sinusoidal position table is fixed in Qwen2-Audio (frozen on load), keep it so
    inner.audio_tower.embed_positions.requires_grad_(False)
    inner.multi_modal_projector.requires_grad_(projector)
    inner.language_model.requires_grad_(decoder)  # includes embed_tokens
    model.lm_head.requires_grad_(decoder)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
