"""Counter-based sampling: the random draw of a token is a pure function of (row seed, position).

``torch.multinomial`` with a generator makes a completion depend on everything sampled
before it in the same stream: the batch it shared, the rank it ran on, how the prompts
were chunked. Here each completion row carries its own 64-bit seed; the uniform noise
for vocabulary entry v at position t is a hash of (seed, t, v) (SplitMix64), and the
token is drawn by the Gumbel-max trick,

    o_t = argmax_v ( z_v / tau + g_v ),   g_v = -log(-log u_v),   u_v ~ U(0, 1),

which samples exactly from softmax(z / tau) restricted to the entries left finite by
top-k / top-p filtering. So a run samples the same completions on 1 or 8 ranks, in any
chunking, and after a resume.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _to_signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's multipliers
_C1, _C2, _GOLD = _to_signed(_M1), _to_signed(_M2), _to_signed(_GOLDEN)  # as int64 for tensors


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x + _GOLD
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def _splitmix64_int(x: int) -> int:
    """``splitmix64`` on one Python int (unsigned 64-bit arithmetic): the same bits, without
    building a tensor for every value (a rollout folds hundreds of row seeds)."""
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _M1) & _MASK64
    x = ((x ^ (x >> 27)) * _M2) & _MASK64
    return x ^ (x >> 31)


def row_seed(*parts: int) -> int:
    """Fold integers (run seed, step, question index, completion index...) into one signed
    64-bit seed."""
    h = 0
    for p in parts:
        h = _to_signed(_splitmix64_int((h ^ (p * _GOLDEN)) & _MASK64))
    return h


def counter_uniform(seeds: torch.Tensor, position: int, vocab_size: int) -> torch.Tensor:
    """Uniform noise in (0, 1), [N, V]: a hash of (seeds[n], position, v)."""
    v = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    base = splitmix64(seeds.to(torch.int64) ^ _to_signed(position * _GOLDEN + 1))  # [N]
    bits = splitmix64(base[:, None] + v[None, :] * _C1)  # [N, V]
    return (_shr(bits, 11).double() + 0.5) / float(1 << 53)  # 53 random bits, never 0 or 1


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor, position: int) -> torch.Tensor:
    """Sample one token per row from softmax(logits) (already tempered and filtered): [N]."""
    u = counter_uniform(seeds, position, logits.shape[-1])
    gumbel = -torch.log(-torch.log(u))
    return (logits.double() + gumbel).argmax(dim=-1)
