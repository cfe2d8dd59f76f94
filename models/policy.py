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
(Qwen2.5-Omni's thinker: its encoder, which ends with its own projection, and its decoder,
found by `audio_tower` and `text_decoder` wherever the transformers release puts them.)

`policy_logprobs` is the one log-prob entry point of training; `group_logprobs` (each prompt
once per group) and `completion_logprobs` (one row per completion) are its two bodies.

Two exact savings over the stock forward (same outputs, up to float summation order):
    - the audio encoder runs over each batch's real frames (plus the convolutions' margin),
      not the whole 30 s window: its attention masks the padding, so the outputs at real
      positions do not depend on it (`audio_features`);
    - the log-prob passes put each prompt through the decoder once per group: the group is
      one packed sequence [q, o_1, ..., o_G] whose block mask lets each completion see the
      prompt and its own past only (`group_logprobs`).

Both families (Qwen2-Audio and Qwen2.5-Omni's thinker) run through the same functions; what
the thinker does differently (its windowed audio encoder without a separate projector, its
three-row rotary positions, its module paths) sits in models.omni behind three hooks:
`text_decoder` / `audio_tower`, `decoder_positions` and the audio branch of `prompt_embeddings`.

Shapes: B prompts, G completions per prompt, N = B * G rows, P prompt length (left padded),
T completion length, H hidden size, V vocabulary size.
"""

import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput

from models import decoding, omni
from models.sampling import gumbel_sample

# Structural tokens that must never be sampled: a sampled <|AUDIO|> breaks the next forward
# ("Audio features and audio tokens do not match"), the others open turns or audio spans.
# Qwen2.5-Omni's vision placeholders likewise (absent from Qwen2-Audio's vocabulary).
SUPPRESSED_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>") + omni.VISION_TOKENS


def text_decoder(model):
    """The text decoder, called with inputs_embeds (its module path differs between families
    and, for Qwen2.5-Omni, between transformers releases)."""
    return omni.text_decoder(model) if omni.is_omni(model) else model.model.language_model


def audio_tower(model):
    """The audio encoder (Qwen2-Audio's, or the thinker's windowed one)."""
    return omni.audio_tower(model) if omni.is_omni(model) else model.model.audio_tower


def decoder_positions(model, positions):
    """1-D positions [B, L] -> what the decoder takes: the same for Qwen2-Audio, three equal
    rows [3, B, L] for Qwen2.5-Omni's M-RoPE (models.omni.rope_positions says why equal)."""
    return omni.rope_positions(positions) if omni.is_omni(model) else positions


def audio_output_lengths(feature_lengths):
    """Mel frames -> (lengths after conv2, lengths after the encoder's 2x average pooling).

    The same arithmetic as Qwen2AudioEncoder._get_feat_extract_output_lengths."""
    conv = (feature_lengths - 1) // 2 + 1
    return conv, (conv - 2) // 2 + 1


def _encoder_forward(self, input_features, attention_mask=None, **kwargs):
    """Qwen2AudioEncoder.forward for any even number of mel frames, not only the full window.

    The same layers in the same order (conv1, conv2, GELU, sinusoidal positions, the
    transformer layers, 2x average pooling, layer norm); the stock forward refuses any
    length but max_source_positions * 2. Bound to the encoder instance by `audio_features`
    and called through the module, so module hooks (FSDP2's unsharding) still run.
    """
    x = input_features.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)
    x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).permute(0, 2, 1)  # [B, S, Ha]
    x = x + self.embed_positions.weight[: x.shape[1]]
    x = F.dropout(x, p=self.dropout, training=self.training)
    for layer in self.layers:
        if self.training and self.layerdrop > 0 and torch.rand([]) < self.layerdrop:
            continue
        out = layer(x, attention_mask)
        x = out[0] if isinstance(out, tuple) else out  # a tuple in older transformers
    x = self.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)  # [B, S/2, Ha]
    return BaseModelOutput(last_hidden_state=self.layer_norm(x))


def kept_frames(feature_lengths, n_frames):
    """Mel frames the encoder needs for a batch's real outputs: the longest clip + 2, even.

    Conv1 (kernel 3, padding 1) then conv2 (kernel 3, stride 2, padding 1) give position j
    a receptive field of frames 2j-2 .. 2j+2; the last real position, j = (L-1) // 2 for L
    real frames, reaches frame L+1. Those frames are kept with their real values (the
    feature extractor's padding), so every real output equals the full window's. Even, so
    that conv2 gives exactly half as many positions.
    """
    needed = int(feature_lengths.max()) + 2
    return min(n_frames, needed + needed % 2)


def audio_features(model, input_features, feature_attention_mask, dtype, *, real_frames=True):
    """[B, S/2, H] projected audio features, each clip through the encoder once, and the
    number of real positions of each clip [B]. `dtype`: the compute dtype (of the encoder mask).

    With `real_frames`, the features are cut to `kept_frames` (the batch's longest clip
    plus the convolutions' margin) instead of the whole window: a 10 s clip in a 30 s
    window runs a third of the positions and a ninth of the attention, same outputs.
    """
    inner = model.model
    tower = inner.audio_tower
    feature_lengths = feature_attention_mask.to(input_features.device).sum(-1)  # [B]
    conv_lengths, out_lengths = audio_output_lengths(feature_lengths)  # [B], [B]
    if real_frames:
        input_features = input_features[..., : kept_frames(feature_lengths, input_features.shape[-1])]
        if not getattr(tower, "_any_length_forward", False):
            tower.forward = _encoder_forward.__get__(tower)
            tower._any_length_forward = True

    # the encoder attends (bidirectionally) only to the real frames of each clip
    B, _, n_frames = input_features.shape
    S = (n_frames - 2) // 2 + 1  # positions after conv2
    frame_mask = (torch.arange(S, device=conv_lengths.device)[None, :] < conv_lengths[:, None]).long()  # [B, S]
    dummy = torch.zeros(B, S, 1, dtype=dtype, device=input_features.device)
    encoder_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=frame_mask)
    hidden = tower(input_features, attention_mask=encoder_mask).last_hidden_state  # [B, S/2, Ha]
    return inner.multi_modal_projector(hidden), out_lengths  # [B, S/2, H], [B]


EMBEDDING_KEYS = ("input_ids", "input_features", "feature_attention_mask")  # what prompt_embeddings reads


def embedding_inputs(prompts: dict) -> dict:
    """The keys of a prompt batch that ``prompt_embeddings`` reads: the batch minus its
    ``attention_mask``, which only the decoder needs."""
    return {k: prompts[k] for k in EMBEDDING_KEYS}


def prompt_embeddings(model, input_ids, input_features, feature_attention_mask, *, real_frames=True):
    """[B, P, H] prompt embeddings: text embeddings with each clip's audio features scattered
    into its <|AUDIO|> positions, exactly as Qwen2AudioModel.forward does, each clip through the
    encoder once (over its real frames only, with `real_frames`: see `audio_features`).
    Call it on a prompt batch as ``prompt_embeddings(model, **embedding_inputs(prompts))``.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, P, H]
    if input_features is None:
        return embeds
    if omni.is_omni(model):  # windowed encoder over the real frames, features already packed
        audio = omni.audio_features(model, input_features, feature_attention_mask)  # [sum(out_lengths), H]
    else:
        audio, out_lengths = audio_features(model, input_features, feature_attention_mask, embeds.dtype,
                                             real_frames=real_frames)
        # keep only positions of real audio, in clip order
        keep = torch.arange(audio.shape[1], device=audio.device)[None, :] < out_lengths.to(audio.device)[:, None]
        audio = audio[keep]  # [sum(out_lengths), H]
    # fill the <|AUDIO|> slots in order
    slots = input_ids == model.config.audio_token_id  # [B, P]
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


def token_logprobs(lm_head, hidden, ids, *, temperature, chunk_size, with_entropy):
    """hidden [n, H], ids [n] -> log pi(ids) [n] (and entropy [n], detached), chunk by chunk.

    lm_head + log_softmax per chunk of rows; under grad, each chunk is recomputed in backward
    (checkpoint), so the [chunk, V] logits are the only vocabulary-wide tensor alive at a time.
    """
    results = []
    for start in range(0, ids.shape[0], chunk_size):
        args = (lm_head, hidden[start:start + chunk_size], ids[start:start + chunk_size], temperature, with_entropy)
        if torch.is_grad_enabled():
            results.append(checkpoint(_token_stats, *args, use_reentrant=False))
        else:
            results.append(_token_stats(*args))
    if not with_entropy:
        return torch.cat(results)
    logp, entropy = zip(*results)
    return torch.cat(logp), torch.cat(entropy)


def _reshape_scores(scores, N, T):
    if isinstance(scores, tuple):
        return tuple(x.view(N, T) for x in scores)
    return scores.view(N, T)


def completion_logprobs(model, prompt_embeds, prompt_mask, completion_ids, *, temperature=1.0, chunk_size=1024,
                        with_entropy=False):
    """log pi(o_t | prompt, o_<t) for every completion token: [N, T] (and entropy [N, T], detached).

    One decoder row per completion: prompt_embeds [N, P, H] (left padded), prompt_mask [N, P],
    completion_ids [N, T]. Used where prompts have different numbers of completions (SFT
    targets); G completions of one prompt are cheaper with `group_logprobs`.
    Tokens after a completion's end are scored too; the caller masks them.
    """
    N, P, _ = prompt_embeds.shape
    T = completion_ids.shape[1]
    completion_embeds = model.get_input_embeddings()(completion_ids)  # [N, T, H]
    embeds = torch.cat([prompt_embeds, completion_embeds.to(prompt_embeds.dtype)], dim=1)  # [N, P+T, H]
    mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(N, T, dtype=torch.long)], dim=1)  # [N, P+T]
    out = text_decoder(model)(inputs_embeds=embeds, attention_mask=mask,
                              position_ids=decoder_positions(model, position_ids_from_mask(mask)), use_cache=False)
    # position P-1+t predicts completion token t
    hidden = out.last_hidden_state[:, P - 1:P + T - 1].reshape(N * T, -1)  # [N*T, H]
    scores = token_logprobs(model.lm_head, hidden, completion_ids.reshape(N * T), temperature=temperature,
                           chunk_size=chunk_size, with_entropy=with_entropy)
    return _reshape_scores(scores, N, T)


def group_attention(prompt_mask, group_size, completion_length, dtype):
    """Additive [B, 1, L, L] mask of the packed groups [q, o_1, ..., o_G], L = P + G*T.

    A prompt token sees the real prompt tokens before it (causal); a token of completion g
    sees the real prompt tokens and the tokens of o_g up to itself, never another
    completion: so each o_g is scored exactly as in its own row [q, o_g]. Every position
    also sees itself, so the rows of left padding are not empty (an empty softmax row is
    NaN, and its values would reach the next layer).
    """
    B, P = prompt_mask.shape
    G, T = group_size, completion_length
    L = P + G * T
    device = prompt_mask.device
    block = torch.cat([torch.zeros(P, dtype=torch.long, device=device),
                       torch.arange(1, G + 1, device=device).repeat_interleave(T)])  # [L] 0: prompt, g: o_g
    position = torch.arange(L, device=device)
    causal = position[:, None] >= position[None, :]  # [L, L]
    visible = causal & ((block[None, :] == 0) | (block[:, None] == block[None, :]))  # [L, L] query x key
    real_key = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, G * T, dtype=torch.bool)], dim=1)  # [B, L]
    allowed = (visible[None] & real_key[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)  # [B, L, L]
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def group_logprobs(model, prompt_embeds, prompt_mask, completion_ids, *, temperature=1.0, chunk_size=1024,
                   with_entropy=False):
    """log pi(o_t | q, o_<t) of G completions per prompt, each prompt through the decoder once: [N, T].

    prompt_embeds [B, P, H] (left padded) and prompt_mask [B, P] hold each prompt once;
    completion_ids [N, T], N = B * G, row b * G + g is completion g of prompt b.

    Each group is one packed sequence [q, o_1, ..., o_G] of length P + G*T with the block
    mask of `group_attention`, and positions that restart after the prompt for every
    completion (o_g's token t is at position |q| + t, as in its own row). The decoder's
    outputs at each o_g are then those of the row [q, o_g] (the same keys with nonzero
    weight, the same positions), so the log-probs and their gradients equal
    `completion_logprobs` on G copies of the prompt, while the prompt's P tokens go through
    the layers once instead of G times; the gradient of the prompt positions is the sum of
    what its G completions send back, as with G copies. Needs a decoder attention that
    takes a 4-D mask (sdpa, eager); others fall back to `completion_logprobs`.
    """
    B, P, H = prompt_embeds.shape
    N, T = completion_ids.shape
    G = N // B
    lm = text_decoder(model)
    if getattr(lm.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):  # e.g. flash_attention_2
        return completion_logprobs(model, prompt_embeds.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0),
                                   completion_ids, temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=with_entropy)
    completion_embeds = model.get_input_embeddings()(completion_ids).to(prompt_embeds.dtype)  # [N, T, H]
    embeds = torch.cat([prompt_embeds, completion_embeds.reshape(B, G * T, H)], dim=1)  # [B, L, H]
    prompt_length = prompt_mask.long().sum(-1, keepdim=True)  # [B, 1]
    offsets = torch.arange(T, device=prompt_mask.device).repeat(G)[None, :]  # [1, G*T]
    position_ids = torch.cat([position_ids_from_mask(prompt_mask), prompt_length + offsets], dim=1)  # [B, L]
    out = lm(inputs_embeds=embeds, attention_mask=group_attention(prompt_mask, G, T, embeds.dtype),
             position_ids=decoder_positions(model, position_ids), use_cache=False)
    # o_g's token t is predicted by the state before it: the prompt's last for t = 0, else o_g's token t-1
    before = P + torch.arange(G, device=embeds.device)[:, None] * T + torch.arange(T, device=embeds.device) - 1  # [G, T]
    before[:, 0] = P - 1
    hidden = out.last_hidden_state[:, before.reshape(-1)].reshape(N * T, H)  # [N*T, H]
    scores = token_logprobs(model.lm_head, hidden, completion_ids.reshape(N * T), temperature=temperature,
                           chunk_size=chunk_size, with_entropy=with_entropy)
    return _reshape_scores(scores, N, T)


def policy_logprobs(model, prompts, completion_ids, *, temperature=1.0, with_entropy=False, shared_prefix=True,
                    real_frames=True, chunk_size=1024, micro_batch_prompts=None):
    """log pi(o_t | q, o_<t) [N, T] (and entropy [N, T]) of G completions per prompt, from the
    processor's batch: the one log-prob entry point of training (the old policy, the
    reference, the update, the supervised step).

    prompts: input_ids [B, P], attention_mask [B, P], input_features [B, M, F],
    feature_attention_mask [B, F]; completion_ids [N, T], N = B * G, grouped by prompt.
    Each clip through the encoder once (over its real frames with `real_frames`); each prompt
    through the decoder once per group with `shared_prefix` (`group_logprobs`), else once per
    completion (`completion_logprobs` on G copies). Both switches change the cost, not the result.
    `micro_batch_prompts`: that many prompts (with their completions) per forward, the results
    concatenated (the passes without gradients; the update calls it per micro-batch itself,
    with a backward after each).
    """
    B = prompts["input_ids"].shape[0]
    G = completion_ids.shape[0] // B
    kw = dict(temperature=temperature, chunk_size=chunk_size, with_entropy=with_entropy)
    if micro_batch_prompts:
        parts = [policy_logprobs(model, {k: v[lo:lo + micro_batch_prompts] for k, v in prompts.items()},
                                 completion_ids[lo * G:(lo + micro_batch_prompts) * G], shared_prefix=shared_prefix,
                                 real_frames=real_frames, **kw)
                 for lo in range(0, B, micro_batch_prompts)]
        return tuple(torch.cat(p) for p in zip(*parts)) if with_entropy else torch.cat(parts)
    embeds = prompt_embeddings(model, **embedding_inputs(prompts), real_frames=real_frames)  # [B, P, H]
    if shared_prefix:
        return group_logprobs(model, embeds, prompts["attention_mask"], completion_ids, **kw)
    return completion_logprobs(model, embeds.repeat_interleave(G, dim=0),
                               prompts["attention_mask"].repeat_interleave(G, dim=0), completion_ids, **kw)


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


def next_tokens(logits, *, suppress, greedy, temperature, top_k, top_p, seeds, step, generator, with_logprobs):
    """One decoding step's choice. logits [n, V] fp32 (changed in place) -> token [n] and, with
    ``with_logprobs``, log pi(token) [n] under logits / temperature over the whole vocabulary,
    before suppression and filtering (what the loss scores; a chosen token is never suppressed
    or filtered). The draw: argmax (greedy), counter-based Gumbel noise of each row's seed at
    this step (``seeds`` [n]: a row's draw does not depend on the batch), or torch.multinomial
    with ``generator``."""
    if with_logprobs:
        raw, log_norm = logits, (logits / temperature).logsumexp(-1)  # [n, V] (the same tensor), [n]
    if suppress.numel():
        logits[:, suppress] = float("-inf")
    if greedy:
        token = logits.argmax(-1)
    else:
        logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
        if seeds is not None:
            token = gumbel_sample(logits, seeds, step)
        else:
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
    chosen = raw.gather(-1, token[:, None]).squeeze(-1) / temperature - log_norm if with_logprobs else None
    return token, chosen


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
             sync_ranks=False, group_size=1, return_logprobs=False, decoder="static", compile_step=False):
    """Sample completions with a KV cache: [N, T <= max_new_tokens] ids, `pad_token_id` after the first end token.

    `decoder`: "static" (models.decoding: a KV cache allocated once and written in place, rows
    dropped as they end, `compile_step` to torch.compile its decode step) or "dynamic" (the loop
    below, on transformers' growing cache). Both give the same tokens and log-probs; "static"
    falls back to "dynamic" where the decoder's attention takes no 4-D mask (flash attention).

    With `group_size` G > 1, prompt_embeds [B, P, H] and prompt_mask [B, P] hold each prompt
    once: the prompt is prefilled once and its KV cache repeated G times, so N = B * G rows
    (row i * G + g is completion g of prompt i) without G prefills of the same prompt.

    Suppressed ids get -inf before temperature, top-k and top-p, so they are never produced.
    With `row_seeds` ([N] int64), row n's token at step t is a pure function of
    (row_seeds[n], t) and its logits (counter-based Gumbel-max, models.sampling), so the
    draw does not depend on the batch, the chunking or the rank; else torch.multinomial
    with `generator`.

    With `return_logprobs`, also the sampler's log-prob of each chosen token [N, T] (0 after
    the end): log_softmax(logits / temperature) over the whole vocabulary, as the loss
    computes it (`_token_stats`), not the filtered distribution the token was drawn from, so
    that it can be compared with the trainer's log-probs of the same tokens (the
    sampler/trainer gap). One logsumexp over the step's [N, V] logits, already computed.
    """
    if decoder not in ("static", "dynamic"):
        raise ValueError(f"decoder must be 'static' or 'dynamic', got {decoder!r}")
    lm, embed = text_decoder(model), model.get_input_embeddings()
    if decoder == "static" and decoding.supports_static_cache(lm):
        return decoding.generate_static(
            model, prompt_embeds, prompt_mask, max_new_tokens=max_new_tokens, end_token_ids=end_token_ids,
            pad_token_id=pad_token_id, suppress_token_ids=suppress_token_ids, temperature=temperature, top_k=top_k,
            top_p=top_p, greedy=greedy, generator=generator, row_seeds=row_seeds, sync_ranks=sync_ranks,
            group_size=group_size, return_logprobs=return_logprobs, compile_step=compile_step)
    device = prompt_embeds.device
    mask = prompt_mask.long()  # [B, P]
    ends = torch.as_tensor(list(end_token_ids), device=device, dtype=torch.long)
    suppress = torch.as_tensor(list(suppress_token_ids), device=device, dtype=torch.long)

    # prefill each prompt once; the hidden state of the last prompt position predicts the first token
    cache, hidden = decoder_step(lm, None, inputs_embeds=prompt_embeds, attention_mask=mask,
                                 position_ids=decoder_positions(model, position_ids_from_mask(mask)))  # hidden [B, H]
    if group_size > 1:  # the G completions of a prompt share its prefill
        cache.batch_repeat_interleave(group_size)
        hidden = hidden.repeat_interleave(group_size, dim=0)  # [N, H]
        mask = mask.repeat_interleave(group_size, dim=0)  # [N, P], grows by one column per step
    N = hidden.shape[0]
    position = mask.sum(-1, keepdim=True)  # [N, 1]: position of the first new token
    done = torch.zeros(N, dtype=torch.bool, device=device)
    seeds = None if row_seeds is None else row_seeds.to(device)  # [N]
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        token, chosen = next_tokens(model.lm_head(hidden).float(), suppress=suppress, greedy=greedy,
                                    temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds, step=step,
                                    generator=generator, with_logprobs=return_logprobs)  # [N], [N]
        token = token.masked_fill(done, pad_token_id)  # [N]
        tokens.append(token)
        if return_logprobs:
            logprobs.append(chosen.masked_fill(done, 0.0))
        done = done | torch.isin(token, ends)
        if step == max_new_tokens - 1 or _all_ranks_done(done, sync_ranks):
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], dim=1)
        cache, hidden = decoder_step(lm, cache, inputs_embeds=embed(token[:, None]), attention_mask=mask,
                                     position_ids=decoder_positions(model, position))
        position = position + 1
    if not tokens:  # max_new_tokens == 0
        ids = torch.empty(N, 0, dtype=torch.long, device=device)
        return (ids, torch.empty(N, 0, device=device)) if return_logprobs else ids
    ids = torch.stack(tokens, dim=1)  # [N, T]
    return (ids, torch.stack(logprobs, dim=1)) if return_logprobs else ids  # [N, T], [N, T] fp32


def decoder_step(lm, cache, **inputs):
    """One call of the text decoder that extends the KV ``cache`` (``None``: a new one).

    Returns (the cache, the last position's hidden state [B, H]). transformers 5.24 renamed the
    cache's argument and output from ``past_key_values`` to ``cache`` (the old name warns, and
    goes in 5.40); the decoder's own signature says which name this release takes.
    """
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    if cache is not None:
        inputs[name] = cache
    out = lm(**inputs, use_cache=True)
    return getattr(out, name), out.last_hidden_state[:, -1]


def suppressed_token_ids(tokenizer, *, vocab_size=None):
    """Ids of <|AUDIO|>, <|audio_bos|>, <|audio_eos|>, <|im_start|> and Qwen2.5-Omni's vision
    placeholders (those in the vocabulary).

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
    if omni.is_omni(model):
        omni.set_trainable(model, audio_encoder=audio_encoder, projector=projector, decoder=decoder)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = model.model
    inner.audio_tower.requires_grad_(audio_encoder)
    # the encoder's sinusoidal position table is fixed in Qwen2-Audio (frozen on load), keep it so
    inner.audio_tower.embed_positions.requires_grad_(False)
    inner.multi_modal_projector.requires_grad_(projector)
    inner.language_model.requires_grad_(decoder)  # includes embed_tokens
    model.lm_head.requires_grad_(decoder)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
