"""Rollout: turn questions into prompts, sample G completions each, read them back as text.

Each clip goes through the audio encoder once per rollout; its prompt embeddings are
repeated G times for the G completions (R1-AQA's trainer repeats the features G times
through the encoder instead; docs/FACTS.md, "The naive trainer").

Greedy answers (the trainer's held-out accuracy and ``evaluate.py``) go through the same
path with G = 1 (``greedy_answers``), under the same settings rule (``sampling_settings``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data.collate import collate_prompts
from data.datasets import Sample
from grpo.algorithm import completion_mask
from models.loading import end_token_ids
from models.lora import adapters_cast_once
from models.policy import embedding_inputs, generate, prompt_embeddings, suppressed_token_ids
from models.sampling import row_seed


@dataclass
class SamplingSettings:
    """What ``generate`` needs besides the prompts: from the config and the checkpoint."""

    max_new_tokens: int
    end_token_ids: list[int]  # generation stops at any of these
    pad_token_id: int  # fills completions after their end
    suppress_token_ids: list[int]  # structural tokens that must never be sampled
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    decoder: str = "static"  # models.policy.generate's decode loop: static (in-place KV cache) or dynamic
    compile_decoder: bool = False  # torch.compile the static decoder's step


def sampling_settings(tokenizer, generation_config, *, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, decoder: str = "static",
                      compile_decoder: bool = False) -> SamplingSettings:
    """The one rule for every generation, sampled or greedy: stop at the checkpoint's end ids,
    pad with its generation config's pad id (else the last end id), never produce the
    structural audio and chat tokens (a sampled ``<|AUDIO|>`` breaks the next forward)."""
    end_ids = end_token_ids(generation_config)
    pad_id = generation_config.pad_token_id if generation_config.pad_token_id is not None else end_ids[-1]
    return SamplingSettings(max_new_tokens=max_new_tokens, end_token_ids=end_ids, pad_token_id=pad_id,
                            suppress_token_ids=suppressed_token_ids(tokenizer), temperature=temperature,
                            top_k=top_k, top_p=top_p, decoder=decoder, compile_decoder=compile_decoder)


def compile_decoder(setting: str, device) -> bool:
    """``rollout.compile_decoder`` on a device: "on", "off", or "auto", what measured fastest there
    (benchmarks/RESULTS.md): eager on a CPU, where compiling does not pay; compiled on CUDA, where
    an eager decode step is bound by kernel launches. FSDP-sharded models decode eagerly whatever
    the setting (``models.decoding``)."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "on"


def prompt_batch(samples: list[Sample], waves: list[np.ndarray], processor, template: int, device) -> dict:
    """Processor inputs for a list of questions, left padded, on ``device``.

    input_ids [B, P], attention_mask [B, P], input_features [B, M, F], feature_attention_mask [B, F]
    """
    batch = collate_prompts(samples, waves, processor, template=template)
    return {k: v.to(device) for k, v in batch.items()}


def slice_prompts(prompts: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in prompts.items()}


def select_prompts(rows: list[tuple[dict, int]], pad_token_id: int) -> dict:
    """The prompt batch of chosen rows of several prompt batches (``(batch, row)`` pairs), as
    ``prompt_batch`` would collate those questions again: the text re-padded on the left to the
    longest chosen prompt, the audio features as they were (they are per clip). Dynamic sampling
    picks its groups this way instead of running the feature extractor a second time."""
    unpadded = [b["input_ids"][i][b["attention_mask"][i].bool()] for b, i in rows]  # [P_i] each
    width = max(t.numel() for t in unpadded)
    input_ids = torch.stack([F.pad(t, (width - t.numel(), 0), value=pad_token_id) for t in unpadded])
    attention_mask = torch.stack([F.pad(torch.ones_like(t), (width - t.numel(), 0)) for t in unpadded])
    return {
        "input_ids": input_ids,  # [B, P]
        "attention_mask": attention_mask.to(rows[0][0]["attention_mask"].dtype),  # [B, P]
        "input_features": torch.stack([b["input_features"][i] for b, i in rows]),  # [B, M, F]
        "feature_attention_mask": torch.stack([b["feature_attention_mask"][i] for b, i in rows]),  # [B, F]
    }


def completion_seeds(seed: int, step: int, round_: int, positions: list[int], group_size: int) -> torch.Tensor:
    """[B*G] int64 seeds, one per completion: a hash of (run seed, step, round, the
    question's global stream position, completion index), so 1 rank and W ranks sample alike."""
    return torch.tensor([row_seed(seed, step, round_, pos, g) for pos in positions for g in range(group_size)],
                        dtype=torch.int64)


def pad_right(rows: list[torch.Tensor], pad_value, width: int | None = None) -> torch.Tensor:
    """Stack [n_i, T_i] tensors into [sum n_i, width], padding on the right (width: max T_i by default)."""
    width = max(r.shape[1] for r in rows) if width is None else width
    return torch.cat([F.pad(r, (0, width - r.shape[1]), value=pad_value) for r in rows])


@torch.no_grad()
def sample_completions(
    model,
    prompts: dict,
    settings: SamplingSettings,
    *,
    group_size: int,
    chunk_prompts: int,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    row_seeds: torch.Tensor | None = None,
    sync_ranks: bool = False,
    real_frames: bool = True,
    return_logprobs: bool = False,
    decoder: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """G completions per prompt, ordered group by group: completion_ids [B*G, T]
    (and, with ``return_logprobs``, the sampler's log-probs of those tokens [B*G, T], 0 after
    the end: see ``models.policy.generate``).

    Steps, per chunk of ``chunk_prompts`` prompts:
      1. encode each clip once and build the prompt embeddings [b, P, H];
      2. prefill each prompt once and repeat its KV cache G times (inside ``generate``);
      3. sample up to max_new_tokens tokens per completion (padded after its end).

    ``row_seeds`` [B*G] gives each completion its own counter-based random stream
    (``models.sampling``), so what is sampled does not depend on chunking or ranks.
    ``real_frames``: the encoder over each chunk's real frames, not the whole window (same result).
    ``decoder``: the decode loop, "static" or "dynamic" (default: the settings'; same result).
    """
    n_prompts = prompts["input_ids"].shape[0]
    chunks, chunk_logprobs = [], []
    with adapters_cast_once(model):  # LoRA: the adapters cast to the compute dtype once per rollout
        for start in range(0, n_prompts, chunk_prompts):
            chunk = _sample_chunk(model, slice_prompts(prompts, start, start + chunk_prompts), settings,
                                  group_size=group_size, greedy=greedy, generator=generator,
                                  row_seeds=None if row_seeds is None
                                  else row_seeds[start * group_size:(start + chunk_prompts) * group_size],
                                  sync_ranks=sync_ranks, real_frames=real_frames, return_logprobs=return_logprobs,
                                  decoder=decoder or settings.decoder)
            if return_logprobs:
                chunk_logprobs.append(chunk[1])
                chunk = chunk[0]
            chunks.append(chunk)
    ids = pad_right(chunks, settings.pad_token_id)
    return (ids, pad_right(chunk_logprobs, 0.0)) if return_logprobs else ids


def _sample_chunk(model, part, settings, *, group_size, greedy, generator, row_seeds, sync_ranks, real_frames,
                  return_logprobs, decoder):
    """One chunk of prompts: its prompt embeddings, then ``generate``."""
    embeds = prompt_embeddings(model, **embedding_inputs(part), real_frames=real_frames)  # [b, P, H]
    return generate(
        model,
        embeds,  # [b, P, H]: each prompt once, its cache shared by its G completions
        part["attention_mask"],  # [b, P]
        group_size=group_size,
        max_new_tokens=settings.max_new_tokens,
        end_token_ids=settings.end_token_ids,
        pad_token_id=settings.pad_token_id,
        suppress_token_ids=settings.suppress_token_ids,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        greedy=greedy,
        generator=generator,
        row_seeds=row_seeds,
        sync_ranks=sync_ranks,
        return_logprobs=return_logprobs,
        decoder=decoder,
        compile_step=settings.compile_decoder,
    )


@torch.no_grad()
def greedy_answers(model, processor, samples: list[Sample], waves: list[np.ndarray], settings: SamplingSettings, *,
                   template: int, device, batch_prompts: int, sync_ranks: bool = False) -> torch.Tensor:
    """Greedy completions of a batch of questions: completion_ids [B, T], padded after the end.

    The one greedy path of the project: the trainer's held-out accuracy and ``evaluate.py``
    both call it (sampling_settings gives the end, pad and suppressed tokens). Steps:
    left-padded prompts on ``device``; then ``sample_completions`` with G = 1, greedy, in
    chunks of ``batch_prompts`` questions.
    """
    prompts = prompt_batch(samples, waves, processor, template, device)
    return sample_completions(model, prompts, settings, group_size=1, chunk_prompts=batch_prompts, greedy=True,
                              sync_ranks=sync_ranks)


def decode_completions(tokenizer, completion_ids: torch.Tensor, end_token_ids: list[int], *,
                       skip_special_tokens: bool = False) -> list[str]:
    """Completion texts, each cut before its first end token.

    By default other special tokens stay in the text, so a completion that wanders into them
    does not look well formatted to the format reward; ``skip_special_tokens=True`` drops them,
    as R1-AQA's test script decodes its benchmark answers.
    """
    mask = completion_mask(completion_ids, end_token_ids)  # [N, T], end token included
    is_end = torch.isin(completion_ids, torch.as_tensor(end_token_ids, device=completion_ids.device))
    keep = mask & ~is_end
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=skip_special_tokens)
        for row, m in zip(completion_ids.cpu(), keep.cpu())
    ]
