"""The rollout's decode loop with a static KV cache: per-token cost that does not grow with what
has been generated, no work for rows that ended, a fixed-shape step that torch.compile can capture.

transformers' dynamic cache grows every layer's keys and values with ``torch.cat`` at every
token (a copy of the whole cache per token and layer), and ``generate``'s loop grows the
attention mask the same way and keeps decoding every row until the last one ends. Here:

  - the prompt is prefilled exactly as before (the decoder's own dynamic cache, each prompt
    once, B rows), then its keys and values are copied once into buffers
    ``[N, H_kv, P + max_new_tokens, D]`` per layer (N = B * G rows, each prompt's KV repeated
    for its G completions), zero beyond the prompt (``StaticKVCache``);
  - each decode step writes the new token's keys and values in place at slot P + t
    (``index_copy_`` with a device index, as transformers' StaticCache does) and attends over
    the buffers under an additive mask ``[N, 1, 1, L]`` that is built once and opened one
    column per step in place; positions advance in place. So the decoder's attention sees the
    same keys as the dynamic cache's (the prompt's real tokens and the completion so far) and
    nothing is concatenated;
  - rows whose completion ended are dropped from the batch (``compact``: one ``index_select``
    of the buffers when rows end), so they cost nothing afterwards. Ranks under FSDP keep
    decoding in lockstep: a rank whose rows all ended still runs the step on one of them until
    every rank is done (the sharded forward is a collective);
  - the end-of-rollout test (an all-reduce under FSDP, a device -> host read of the ``done``
    flags) runs every ``check_every`` steps: 1 on a CPU, where the read costs nothing; every 16
    on a GPU, so that no token waits on the host. Steps past the last end are trimmed, so the
    output is the same whatever ``check_every`` is;
  - with ``compile_step``, the decoder call (fixed shapes: the whole
    buffer length, the batch bucketed to a power of two) go through ``torch.compile``; eager,
    each step attends over the filled part of the buffers only (a view, no copy).

What is sampled is the same function of (row seed, step, logits) as in the dynamic loop
(models.sampling's counter-based Gumbel-max), and the logits are the same up to float
summation order (the masked keys add exact zeros), so the tokens and the sampler's log-probs
are those of the dynamic loop; tests/test_decoding.py checks that on both families.

Shapes: B prompts, G completions per prompt, N = B * G rows, n <= N rows still decoding,
P prompt length (left padded), T = max_new_tokens, L = P + T, H hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch



class StaticKVCache:
    """Per-layer key/value buffers ``[n, H_kv, L, D]``, written in place at ``slot``.

    Duck-typed to what the decoder's attention calls (``update``) on transformers 5.17 and 5.24
    alike; the prefill goes through the decoder's own dynamic cache and is copied in by
    ``from_prefill``. ``window``: the number of leading slots the attention reads (eager), or
    None for the whole buffer (a fixed shape, for torch.compile).
    """

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.keys, self.values = keys, values  # [n, H_kv, L, D] per layer
        self.slot = slot  # [1] long: where the current token's keys and values go
        self.window: int | None = None

    @classmethod
    def from_prefill(cls, prefill_cache, group_size: int, length: int) -> "StaticKVCache":
        """Buffers of `length` slots from a prefilled dynamic cache of B rows, each row repeated
        `group_size` times (row b * G + g is completion g of prompt b); zero after the prompt,
        so that masked slots add exact zeros (an uninitialised NaN would survive a 0 weight)."""
        keys, values = [], []
        for layer in prefill_cache.layers:
            for source, out in ((layer.keys, keys), (layer.values, values)):
                B, H, P, D = source.shape
                buffer = source.new_zeros(B * group_size, H, length, D)
                buffer[:, :, :P] = source.repeat_interleave(group_size, dim=0)
                out.append(buffer)
        P = prefill_cache.layers[0].keys.shape[2]
        return cls(keys, values, torch.full((1,), P, dtype=torch.long, device=keys[0].device))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Write the step's keys/values [n, H_kv, 1, D] at ``slot``; return the buffers to attend over."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slot, key_states)
        v.index_copy_(2, self.slot, value_states)
        if self.window is None:
            return k, v
        return k[:, :, :self.window], v[:, :, :self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.slot)

    def compact(self, rows: torch.Tensor) -> None:
        """Keep only `rows` [n'] of the batch (one copy of the buffers)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class SharedPromptKVCache(StaticKVCache):
    """The prompt's keys and values once per group ``[B, H_kv, P, D]`` (from the prefill, never
    repeated), and each row's own completion in buffers ``[n, H_kv, T, D]`` written in place.

    A decode step's attention (``shared_prompt_attention``) then reads each prompt's KV once
    for its G rows instead of G copies: softmax over [prompt keys, own keys] computed as the
    two parts' partial softmaxes, combined exactly through their log-sum-exp. ``rows`` [n]:
    each batch row's completion index b * G + g, so its group b and place g.
    """

    def __init__(self, prefill_cache, group_size: int, length: int, prompt_mask: torch.Tensor):
        self.prompt_keys = [layer.keys for layer in prefill_cache.layers]  # [B, H_kv, P, D] per layer
        self.prompt_values = [layer.values for layer in prefill_cache.layers]
        B, H, P, D = self.prompt_keys[0].shape
        N = B * group_size
        keys = [k.new_zeros(N, H, length, D) for k in self.prompt_keys]
        values = [v.new_zeros(N, H, length, D) for v in self.prompt_values]
        super().__init__(keys, values, torch.zeros(1, dtype=torch.long, device=keys[0].device))
        self.group_size = group_size
        self.prompt_bias = torch.zeros(B, P, dtype=torch.float32, device=prompt_mask.device).masked_fill(
            ~prompt_mask.bool(), torch.finfo(torch.float32).min)  # [B, P]
        self.set_rows(torch.arange(N, device=keys[0].device))

    def set_rows(self, rows: torch.Tensor) -> None:
        self.group, self.place = rows // self.group_size, rows % self.group_size  # [n], [n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prompt_keys[0].shape[2] + int(self.slot)


_ACTIVE: list[SharedPromptKVCache] = []  # the cache of the decode step now running (shared_prompt_attention)
SHARED_PROMPT_ATTENTION = "grpo_shared_prompt"


def shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per row over its prompt's keys (once per group) and its own.

    query [n, H, 1, D]; key, value [n, H_kv, t, D] (the row's own completion so far);
    attention_mask {additive [n, 1, 1, t]} over the own keys. Each part's scores s give
    m = max s, l = sum exp(s - m) and o = sum exp(s - m) v; the whole softmax's output is

        (e^(m_p - m) o_p + e^(m_o - m) o_o) / (e^(m_p - m) l_p + e^(m_o - m) l_o),  m = max(m_p, m_o)

    the same value as one softmax over the concatenated keys (fp32 scores, as the eager
    attention). Returns ([n, 1, H, D], None), as transformers' attention functions do.
    """
    cache = _ACTIVE[-1]
    layer = module.layer_idx
    Kp, Vp = cache.prompt_keys[layer], cache.prompt_values[layer]  # [B, H_kv, P, D]
    n, H, _, D = query.shape
    B, Hkv = Kp.shape[0], Kp.shape[1]
    r = H // Hkv  # query heads per key/value head (head h reads key/value head h // r)
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.reshape(n, Hkv, r, D)
    # the prompt part, per group: the rows laid out [B, G] (absent ones zero), each prompt read once
    grid = q.new_zeros(B, cache.group_size, Hkv, r, D)
    grid[cache.group, cache.place] = q
    s_p = torch.einsum("bgkrd,bkpd->bgkrp", grid, Kp).float() * scaling + cache.prompt_bias[:, None, None, None, :]
    m_p = s_p.amax(-1, keepdim=True)  # [B, G, H_kv, r, 1]
    e_p = (s_p - m_p).exp()
    l_p = e_p.sum(-1, keepdim=True)
    o_p = torch.einsum("bgkrp,bkpd->bgkrd", e_p.to(Vp.dtype), Vp).float()
    m_p, l_p, o_p = (x[cache.group, cache.place] for x in (m_p, l_p, o_p))  # [n, H_kv, r, .]
    # the row's own part
    s_o = torch.einsum("nkrd,nktd->nkrt", q, key).float() * scaling + attention_mask.reshape(n, 1, 1, -1).float()
    m_o = s_o.amax(-1, keepdim=True)
    e_o = (s_o - m_o).exp()
    l_o = e_o.sum(-1, keepdim=True)
    o_o = torch.einsum("nkrt,nktd->nkrd", e_o.to(value.dtype), value).float()
    m = torch.maximum(m_p, m_o)
    a_p, a_o = (m_p - m).exp(), (m_o - m).exp()
    out = (a_p * o_p + a_o * o_o) / (a_p * l_p + a_o * l_o)  # [n, H_kv, r, D]
    return out.reshape(n, 1, H, D).to(query.dtype), None


def _register_shared_prompt_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)


_register_shared_prompt_attention()


def decode_mask(prompt_mask: torch.Tensor, group_size: int, length: int, dtype) -> torch.Tensor:
    """The additive key mask ``[N, 1, 1, L]`` of the first decode step: the prompt's real tokens
    visible, every completion slot closed (each step opens its own slot in place)."""
    N, P = prompt_mask.shape[0] * group_size, prompt_mask.shape[1]
    visible = torch.zeros(N, length, dtype=torch.bool, device=prompt_mask.device)
    visible[:, :P] = prompt_mask.bool().repeat_interleave(group_size, dim=0)
    mask = torch.zeros(N, 1, 1, length, dtype=dtype, device=prompt_mask.device)
    return mask.masked_fill(~visible[:, None, None, :], torch.finfo(dtype).min)


def supports_static_cache(lm) -> bool:
    """Attention that takes an additive 4-D mask (sdpa, eager) over full-attention layers only."""
    kinds = set(getattr(lm.config, "layer_types", None) or ["full_attention"])
    return getattr(lm.config, "_attn_implementation", "sdpa") in ("sdpa", "eager") and kinds == {"full_attention"}


def _bucket(n: int, fixed_shapes: bool) -> int:
    """Rows to keep for n live rows: n eager; the next power of two with compiled steps, so that
    a rollout recompiles at most log2(N) + 1 times."""
    return 1 << (n - 1).bit_length() if fixed_shapes else n


def _ranks_done(done: torch.Tensor, sync_ranks: bool) -> bool:
    """Whether every row on every rank has ended (an all-reduce under FSDP: the same answer on
    every rank, so every rank runs the same number of decoder steps)."""
    flag = done.all().to(torch.int32).reshape(1)
    if sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _completion_width(lengths: torch.Tensor, sync_ranks: bool) -> int:
    """The rollout's width: the longest completion, over every rank under FSDP (as the dynamic
    loop, which stops when the last row of the last rank ends)."""
    width = lengths.max().reshape(1) if lengths.numel() else lengths.new_zeros(1)
    if sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    return int(width.item())


def default_check_every(device: torch.device) -> int:
    return 1 if device.type == "cpu" else 16


@torch.no_grad()
def generate_static(model, prompt_embeds, prompt_mask, *, max_new_tokens, end_token_ids, pad_token_id,
                    suppress_token_ids, temperature=1.0, top_k=0, top_p=1.0, greedy=False, generator=None,
                    row_seeds=None, sync_ranks=False, group_size=1, return_logprobs=False, compile_step=False,
                    check_every=None, shared_prompt=None):
    """``models.policy.generate``'s contract (same arguments, same outputs) on a static KV cache.

    Rows are dropped as they end when each row's draw is its own (greedy, or ``row_seeds``);
    with a shared ``generator`` the draw of a row depends on the batch, so every row stays.
    ``shared_prompt`` (default: with G > 1): each prompt's KV once per group
    (``SharedPromptKVCache``), else G copies (``StaticKVCache``).
    """
    from models.policy import decoder_positions, decoder_step, next_tokens, position_ids_from_mask, text_decoder

    lm, embed, head = text_decoder(model), model.get_input_embeddings(), model.lm_head
    device = prompt_embeds.device
    B, P, _ = prompt_embeds.shape
    G, T = group_size, max_new_tokens
    N = B * G
    ends = torch.as_tensor(list(end_token_ids), device=device, dtype=torch.long)
    suppress = torch.as_tensor(list(suppress_token_ids), device=device, dtype=torch.long)
    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)  # [N, T]
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)  # [N, T]
    if T == 0:
        return (tokens, logprobs) if return_logprobs else tokens
    check_every = check_every or default_check_every(device)
    if compile_step and any(type(p.data).__name__ == "DTensor" for p in lm.parameters()):
        compile_step = False  # FSDP2's per-unit hooks gather the weights: decoded eagerly
    can_compact = greedy or row_seeds is not None

    # prefill each prompt once (the decoder's own cache: the same computation as the dynamic loop)
    mask = prompt_mask.long()  # [B, P]
    prefill, hidden = decoder_step(lm, None, inputs_embeds=prompt_embeds, attention_mask=mask,
                                   position_ids=decoder_positions(model, position_ids_from_mask(mask)))  # [B, H]
    shared_prompt = G > 1 if shared_prompt is None else shared_prompt
    if shared_prompt:  # the last token is never fed back: T - 1 own slots
        cache = SharedPromptKVCache(prefill, G, T - 1, mask)
        key_mask = torch.full((N, 1, 1, T - 1), torch.finfo(prompt_embeds.dtype).min, dtype=prompt_embeds.dtype,
                              device=device)  # [N, 1, 1, T - 1] over the own slots
        window_start = 0
    else:
        cache = StaticKVCache.from_prefill(prefill, G, P + T - 1)
        key_mask = decode_mask(mask, G, P + T - 1, prompt_embeds.dtype)  # [N, 1, 1, L]
        window_start = P
    del prefill
    hidden = hidden.repeat_interleave(G, dim=0)  # [N, H]
    position = mask.sum(-1, keepdim=True).repeat_interleave(G, dim=0)  # [N, 1]: the first new token's
    seeds = None if row_seeds is None else row_seeds.to(device)  # [N], once per rollout
    rows = torch.arange(N, device=device)  # [n]: the output row of each batch row
    done = torch.zeros(N, dtype=torch.bool, device=device)  # [n]
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    step_fn = _compiled_step(model) if compile_step else _eager_step

    for step in range(T):
        token, chosen = next_tokens(head(hidden).float(), suppress=suppress, greedy=greedy, temperature=temperature,
                                    top_k=top_k, top_p=top_p, seeds=seeds, step=step, generator=generator,
                                    with_logprobs=return_logprobs)  # [n], [n]
        token = token.masked_fill(done, pad_token_id)  # [n]
        tokens[rows, step] = token
        if return_logprobs:
            logprobs[rows, step] = chosen.masked_fill(done, 0.0)
        done = done | torch.isin(token, ends)
        if step == T - 1:
            break
        if (step + 1) % check_every == 0:
            if _ranks_done(done, sync_ranks):
                break
            if can_compact:
                live = (~done).nonzero().squeeze(-1)  # [n'] (a host read: the step's flags are already there)
                keep = _bucket(max(int(live.numel()), 1), compile_step)
                if keep < rows.numel():
                    # live rows first, then ended ones to fill the bucket (one, if this rank is done)
                    order = torch.cat([live, done.nonzero().squeeze(-1)])[:keep]
                    cache.compact(order)
                    key_mask = key_mask.index_select(0, order)
                    if shared_prompt:
                        cache.set_rows(rows[order])
                    rows, done, position, token = rows[order], done[order], position[order], token[order]
                    if seeds is not None:
                        seeds = seeds[order]
        # open the fed token's slot in the mask, feed it, advance
        key_mask.index_fill_(-1, cache.slot, 0.0)
        cache.window = None if compile_step else window_start + step + 1
        with _attention_for(lm, cache):
            hidden = step_fn(lm, cache, name, embed(token[:, None]), key_mask, decoder_positions(model, position))
        position += 1
        cache.slot += 1

    lengths = _row_lengths(tokens, ends, pad_token_id)
    width = _completion_width(lengths, sync_ranks)
    tokens = tokens[:, :width]
    return (tokens, logprobs[:, :width]) if return_logprobs else tokens


def _row_lengths(tokens: torch.Tensor, ends: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[N] tokens up to and with each row's first end token (T for a row that never ended)."""
    T = tokens.shape[1]
    is_end = torch.isin(tokens, ends)  # [N, T]
    first = torch.where(is_end, torch.arange(T, device=tokens.device), T).min(-1).values  # [N]
    return torch.where(first < T, first + 1, T)


def _eager_step(lm, cache, name, inputs_embeds, key_mask, position_ids):
    """One decoder call on the static cache: the new token's last hidden state [n, H].

    The mask goes in as the decoder's per-attention-kind dict, which it takes as it is: no
    mask is built by transformers per step (nor its host-side checks)."""
    if cache.window is not None:
        key_mask = key_mask[..., :cache.window]
    out = lm(inputs_embeds=inputs_embeds, attention_mask={"full_attention": key_mask}, position_ids=position_ids,
             use_cache=True, **{name: cache})
    return out.last_hidden_state[:, -1]


@contextlib.contextmanager
def _attention_for(lm, cache):
    """Around a decode step on a SharedPromptKVCache: the decoder's layers call
    ``shared_prompt_attention`` (they read the attention function's name from their config at
    each call), which finds the cache here. Set outside the (possibly compiled) step."""
    if not isinstance(cache, SharedPromptKVCache):
        yield
        return
    config, before = lm.config, lm.config._attn_implementation_internal
    config._attn_implementation_internal = SHARED_PROMPT_ATTENTION
    _ACTIVE.append(cache)
    try:
        yield
    finally:
        config._attn_implementation_internal = before
        _ACTIVE.pop()


def _compiled_step(model):
    """`_eager_step` through torch.compile, built once per model (the buffers' full length and a
    bucketed batch: fixed shapes; CUDA graphs on a GPU with mode "reduce-overhead")."""
    fn = getattr(model, "_compiled_decode_step", None)
    if fn is None:
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        compiled = torch.compile(_eager_step, mode=mode, dynamic=False)

        def fn(*args):
            try:
                return compiled(*args)
            except Exception as error:  # compiling failed (before the step ran): decode eagerly from now on
                warnings.warn(f"models.decoding: torch.compile of the decode step failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); decoding eagerly")
                model._compiled_decode_step = _eager_step
                return _eager_step(*args)
        model._compiled_decode_step = fn
    return fn
