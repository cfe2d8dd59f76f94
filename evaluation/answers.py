"""Greedy answers of one checkpoint to a benchmark's questions, and the files that keep them.

``generate_answers`` orders the questions by prompt length, batches them and answers each
batch with ``grpo.rollout.greedy_answers`` (the trainer's held-out evaluation uses the same
function, under the same end, pad and suppressed-token rule). A question whose clip cannot be
read, or whose prompt does not fit, is an error (``on_error="raise"``) or an outcome with the
reason (``"skip"``).

Files: per-rank progress files (a killed evaluation resumes), ``predictions.json`` in the
benchmark's own schema, and the reuse of a complete earlier evaluation with the same fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from data.quote import cut
from data.scoring import extract_answer


@dataclass
class Generated:
    """One question's outcome: a completion, or the reason its audio could not be read."""

    index: int
    completion: str | None = None
    error: str | None = None
    n_tokens: int = 0  # completion tokens, end token included
    truncated: bool = False  # stopped by max_new_tokens, not by an end token

    def to_json(self) -> dict:
        return dataclasses.asdict(self)



def prompt_length_estimate(sample, text_tokens: int, window_seconds: float = 30.0) -> float:
    """Decoder prompt length without running the processor: text + ~25 tokens per second of audio.

    Only used to order questions so a batch holds similar lengths; the audio part dominates.
    """
    try:
        import soundfile

        seconds = min(soundfile.info(sample.audio_path).duration, window_seconds)
    except Exception:  # missing or broken: reported when the clip is actually loaded
        seconds = 0.0
    return text_tokens + 25.0 * seconds



def generate_answers(
    model,
    processor,
    samples: Sequence,
    indices: Sequence[int],
    *,
    template: int,
    settings,
    batch_size: int,
    device,
    load_audio,
    on_batch=None,
    progress=None,
    on_error: str = "skip",
    max_prompt_tokens: int | None = None,
) -> list[Generated]:
    """Greedy completions for ``samples[i]`` for i in ``indices`` (any order in, same order out).

    Steps:
      1. sort the questions by estimated prompt length, longest first (an out-of-memory batch
         shows up at once), and batch them;
      2. per batch: load each clip and check its prompt length (``data.collate.prompt_length``,
         exact) against ``max_prompt_tokens``; a clip that cannot be read or a prompt that is
         too long raises (``on_error="raise"``: AudioError naming the file, DataError naming the
         sample) or gives a ``Generated`` with the reason in ``error`` (``"skip"``);
      3. answer the rest with ``greedy_answers`` under ``settings`` (a ``SamplingSettings``) and
         decode them as R1-AQA's test script does (special tokens dropped);
      4. ``on_batch(list[Generated])`` after each batch (progress files).
    """
    fe = processor.feature_extractor
    order = longest_first(samples, indices, processor.tokenizer, template, fe.n_samples / fe.sampling_rate)
    out: dict[int, Generated] = {}
    for start in range(0, len(order), batch_size):
        batch_idx = order[start: start + batch_size]
        done, ok, waves = _usable_clips(samples, batch_idx, processor, template=template, load_audio=load_audio,
                                        on_error=on_error, max_prompt_tokens=max_prompt_tokens)
        if ok:
            done += _answer_batch(model, processor, [samples[i] for i in ok], ok, waves, settings,
                                  template=template, device=device)
        for g in done:
            out[g.index] = g
        if on_batch is not None:
            on_batch(done)
        if progress is not None:
            progress.update(len(batch_idx))
    return [out[i] for i in indices]


def longest_first(samples: Sequence, indices: Sequence[int], tokenizer, template: int,
                  window: float) -> list[int]:
    """``indices`` sorted by estimated prompt length, longest first."""
    from data.prompts import format_prompt

    lengths = {}
    for i in indices:
        s = samples[i]
        text = format_prompt(s.question, s.choices, template)
        lengths[i] = prompt_length_estimate(s, len(tokenizer(text).input_ids), window)
    return sorted(indices, key=lambda i: -lengths[i])


def _usable_clips(samples: Sequence, batch_idx: Sequence[int], processor, *, template: int, load_audio,
                  on_error: str, max_prompt_tokens: int | None) -> tuple[list[Generated], list[int], list]:
    """Load each clip of a batch and check its prompt's exact length: (the outcomes of the
    questions left out, with their reasons; the indices kept; their waveforms). Raises instead
    of leaving out unless ``on_error="skip"``."""
    from data.audio import AudioError
    from data.collate import prompt_length
    from data.datasets import DataError

    done: list[Generated] = []
    ok, waves = [], []
    for i in batch_idx:
        try:
            wave = load_audio(samples[i].audio_path)
        except AudioError as err:
            if on_error != "skip":
                raise
            done.append(Generated(index=i, error=str(err)))
            continue
        n = prompt_length(samples[i], len(wave), processor, template=template)
        if max_prompt_tokens is not None and n > max_prompt_tokens:  # prompts are never cut: left out
            reason = (f"sample {cut(samples[i].id)} ({samples[i].audio_path}): its prompt is {n} tokens (text + "
                      f"audio), over the limit of {max_prompt_tokens}")
            if on_error != "skip":
                raise DataError(f"{reason}. Prompts are never cut; data.on_error=skip leaves such "
                                "questions out (counted)")
            done.append(Generated(index=i, error=reason))
            continue
        ok.append(i)
        waves.append(wave)
    return done, ok, waves


def _answer_batch(model, processor, batch: list, indices: list[int], waves: list, settings, *, template: int,
                  device) -> list[Generated]:
    """Greedy completions of one batch, decoded as R1-AQA's test script does (special tokens dropped)."""
    import torch

    from grpo.algorithm import completion_mask
    from grpo.rollout import decode_completions, greedy_answers

    end_ids = settings.end_token_ids
    ids = greedy_answers(model, processor, batch, waves, settings, template=template,
                         device=device, batch_prompts=len(batch)).cpu()  # [b, T]
    texts = decode_completions(processor.tokenizer, ids, end_ids, skip_special_tokens=True)
    n_tokens = completion_mask(ids, end_ids).sum(dim=1).tolist()  # end token included
    ended = torch.isin(ids, torch.tensor(end_ids)).any(dim=1).tolist()  # [b]
    return [Generated(index=i, completion=text, n_tokens=int(n_tok), truncated=not end)
            for i, text, n_tok, end in zip(indices, texts, n_tokens, ended)]


# --------------------------------------------------------------------------- files

def remove_tree(path: Path) -> None:
    """Remove the folder ``path``; a link there is removed itself, never what it points to."""
    import shutil

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append ``lines`` to ``path``; a link there is an error (OSError), never appended through."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


def write_json(path: Path, value: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def weights_fingerprint(path: Path) -> list[list]:
    """``[name, size, mtime_ns]`` of every weights and config file of a checkpoint directory:
    new weights written at the same path change it (hashing 16 GB of weights would take minutes)."""
    wanted = (".safetensors", ".bin", ".json")
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir())
            if p.is_file() and p.name.endswith(wanted)]



def read_progress(folder: Path) -> dict[int, Generated]:
    """Finished questions from the per-rank progress files (a torn last line is ignored)."""
    done: dict[int, Generated] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        # a kill can cut the last line inside a UTF-8 character: it is dropped like any torn line
        for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:  # a torn last line, or a row that is not one of ours, is not an answer
                row = json.loads(line)
                generated = Generated(**row)
            except (ValueError, TypeError, RecursionError):  # ValueError: JSONDecodeError, a too-long integer
                continue
            if type(generated.index) is int and generated.index >= 0 and type(generated.n_tokens) is int and (
                    isinstance(generated.completion, str) or isinstance(generated.error, str)):
                done[generated.index] = generated
    return done


def previous_results(out_dir: Path, fingerprint: dict, samples: Sequence) -> dict[int, Generated] | None:
    """Outcomes stored in a complete earlier evaluation with the same fingerprint, else None."""
    info_path, pred_path = out_dir / "eval_info.json", out_dir / "predictions.json"
    if not (info_path.is_file() and pred_path.is_file()):
        return None
    try:
        info, records = read_json(info_path), read_json(pred_path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(info, dict) or not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None  # not what an evaluation writes: generate again
    if info.get("fingerprint") != fingerprint or len(records) != len(samples):
        return None
    try:
        errors = {m["index"]: m["error"] for m in info.get("missing_audio", [])}
        lengths = list(info.get("completion_tokens", []))
        truncated = set(info.get("truncated", []))
    except (TypeError, KeyError, AttributeError):  # edited by hand: not reusable
        return None
    results = {}
    for i, record in enumerate(records):
        if str(record.get("id")) != samples[i].id:
            return None
        if i in errors and isinstance(errors[i], str):
            results[i] = Generated(index=i, error=errors[i])
        elif isinstance(record.get("model_completion"), str):
            n_tok = lengths[i] if i < len(lengths) and type(lengths[i]) is int else 0
            results[i] = Generated(index=i, completion=record["model_completion"], n_tokens=n_tok,
                                   truncated=i in truncated)
        else:
            return None  # neither an answer nor a known audio error: not complete
    return results


def prediction_records(samples: Sequence, results: Sequence[Generated], *, skip_missing_audio: bool,
                       submission: bool = False) -> list[dict]:
    """The benchmark's own records, in file order, each with the model's answer added."""
    records = []
    for sample, g in zip(samples, results):
        record = dict(sample.meta)
        if g.error is not None:
            if not skip_missing_audio:
                # an empty answer is wrong, and keeps the benchmark's denominator
                record.update(model_prediction="", model_output="")
                if not submission:
                    record["model_completion"] = None
            # skipped: no prediction key, so the scorer leaves the record out
        else:
            answer = extract_answer(g.completion)
            record.update(model_prediction=answer, model_output=answer)
            if not submission:
                record["model_completion"] = g.completion
        records.append(record)
    return records

