"""Benchmark evaluation: greedy answers of one or more checkpoints, scored the MMAU way.

For each checkpoint (a transformers-format directory, or every ``checkpoints/step_<N>/hf``
export of a run directory):

1. every rank takes a strided shard of the questions not answered yet, sorts it by prompt
   length (similar lengths batch with little padding) and generates greedily, appending each
   finished batch to ``progress/rank<r>.jsonl`` so a killed evaluation resumes where it stopped;
2. the answers are gathered on rank 0 (``all_gather_object``), deduplicated by question index
   and checked to cover every question exactly once;
3. rank 0 writes, in ``<output.dir>/<checkpoint name>/``:
   ``predictions.json`` (the benchmark's own records + ``model_prediction``, ``model_output``
   (both the extracted answer) and ``model_completion`` (the raw text)), ``scores.json``
   (:func:`data.scoring.score`), ``eval_info.json`` (settings, missing audio, lengths), and
   prints the score tables. A benchmark without answers (MMAU test) gets ``submission.json``
   instead of scores.

Across checkpoints rank 0 writes ``summary.txt`` / ``summary.json`` (rows ordered by step, best
total marked) and TensorBoard scalars ``eval/<dataset>/<task>`` and ``eval/<dataset>/total``.

A question whose audio is missing, undecodable or not finite, or whose prompt (text + audio
tokens) plus ``max_new_tokens`` does not fit the model's context (or ``data.max_prompt_tokens``),
stops the evaluation with an error naming it (``data.on_error: raise``, the default). With
``data.on_error: skip`` it is listed by id, counted (``skipped_samples``) and kept in the
predictions with an empty answer (counted wrong: the denominator stays the benchmark's); with
``data.skip_missing_audio`` as well, its record carries no prediction key, so the scorer leaves
it out, exactly as the official MMAU script does with unanswered records.

Predictions are reused only when the fingerprint matches: the weights files (names, sizes,
modification times) as well as the data, prompt and length settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from data.scoring import extract_answer, ordered_groups, score_report
from grpo.config import ConfigError, at_least, check_choices, check_ranges, read_into

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- configuration


@dataclass
class EvalDataConfig:
    format: str = "mmau"  # mmau, mmar, avqa or synthetic (AVQA-format JSONL)
    path: str = ""  # the benchmark file ("{version}" and "{template}" are replaced, also in names and dirs)
    version: str = ""  # e.g. MMAU test-mini "2024-12" (R1-AQA's numbers) or "v05.15.25"
    name: str = ""  # dataset name in TensorBoard tags and tables; default: the format
    audio_root: str | None = None  # base of relative audio paths (default: the file's folder)
    audio_channel: str = "first"  # first channel (as R1-AQA) or mean of channels
    prompt_template: int = 2  # R1-AQA prompt <1>, <2> or <3>
    on_error: str = "raise"  # raise: a bad record, clip or over-long prompt stops, named; skip: counted
    skip_missing_audio: bool = False  # with on_error=skip: leave skipped questions out (default: count them wrong)
    max_prompt_tokens: int = 0  # prompt limit (text + audio tokens); 0: the model's context minus max_new_tokens
    limit: int = 0  # evaluate only the first N questions (0: all), for quick looks
    # synthetic format only: write the set when `path` does not exist yet
    synthetic_generate: bool = False
    synthetic_size: int = 200
    synthetic_seed: int = 1
    synthetic_difficulty: str = "easy"  # easy, medium, hard or mixed
    synthetic_tasks: list[str] = field(default_factory=list)


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int = 256  # R1-AQA's completion limit
    batch_size: int = 8  # questions generated together on one rank


@dataclass
class EvalModelConfig:
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32, float16
    device: str = "auto"  # auto (cuda:<local rank> when available, else cpu), cpu or cuda


@dataclass
class EvalOutputConfig:
    dir: str = "eval/default"  # <dir>/<checkpoint name>/predictions.json, scores.json, ...
    log_dir: str | None = None  # TensorBoard directory (default: <dir>/tb); "" disables it
    progress_bar: bool = True  # tqdm on rank 0


@dataclass
class EvalConfig:
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)


_CHOICES = {
    "data.format": ("mmau", "mmar", "avqa", "synthetic"),
    "data.on_error": ("raise", "skip"),
    "data.audio_channel": ("first", "mean"),
    "data.prompt_template": (1, 2, 3),
    "data.synthetic_difficulty": ("easy", "medium", "hard", "mixed"),
    "model.dtype": ("auto", "bfloat16", "float32", "float16"),
    "model.device": ("auto", "cpu", "cuda"),
}
_RANGES = {
    "data.limit": at_least(0),
    "data.max_prompt_tokens": at_least(0),
    "data.synthetic_size": at_least(1),
    "data.synthetic_seed": at_least(0),
    "generation.max_new_tokens": at_least(1),
    "generation.batch_size": at_least(1),
}


def load_eval_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """YAML sections ``data``, ``generation``, ``model``, ``output`` + ``section.key=value`` overrides.

    Unknown keys and wrong types are ConfigErrors naming the key and the file (the checks are
    grpo.config's, shared with the training config).
    """
    config = EvalConfig()
    source = read_into(config, path, overrides)
    check_choices(config, _CHOICES, source)
    check_ranges(config, _RANGES, source)
    if not config.data.path:
        raise ConfigError(f"'data.path' is not set in {source}")
    uses_version = [k for k, v in (("data.path", config.data.path), ("data.name", config.data.name),
                                   ("output.dir", config.output.dir), ("output.log_dir", config.output.log_dir))
                    if v and "{version}" in v]
    if uses_version and not config.data.version:
        raise ConfigError(f"{uses_version[0]} in {source} uses {{version}} but 'data.version' is empty")
    return config


def expand(text: str, config: EvalConfig) -> str:
    """``{version}`` and ``{template}`` in paths and names, so versions and prompts never share files."""
    return text.replace("{version}", config.data.version).replace("{template}", str(config.data.prompt_template))


def dataset_path(config: EvalConfig) -> Path:
    return Path(expand(config.data.path, config))


def dataset_name(config: EvalConfig) -> str:
    return expand(config.data.name or config.data.format, config)


def output_dir(config: EvalConfig) -> Path:
    return Path(expand(config.output.dir, config))


def tensorboard_dir(config: EvalConfig) -> Path | None:
    if config.output.log_dir == "":
        return None
    return Path(expand(config.output.log_dir, config)) if config.output.log_dir else output_dir(config) / "tb"


# --------------------------------------------------------------------------- checkpoints

_STEP = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # output folder name, unique among the checkpoints of one invocation
    path: Path  # the transformers-format directory
    step: int  # parsed from step_<N> in the path; 0 for a base model


def _step_of(path: Path) -> int:
    for part in reversed(path.parts):
        match = _STEP.match(part)
        if match:
            return int(match.group(1))
    return 0


def _name_of(path: Path) -> str:
    """``runs/x/checkpoints/step_100/hf`` -> ``x-step_100``; any other directory -> its name."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if _STEP.match(parts[i]):
            run = parts[i - 2] if i >= 2 and parts[i - 1] == "checkpoints" else (parts[i - 1] if i >= 1 else "")
            return f"{run}-{parts[i]}" if run else parts[i]
    return path.name


def run_exports(run_dir: Path) -> list[Path]:
    """``<run>/checkpoints/step_<N>/hf`` directories of a run, by step (the trainer's layout)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p / "hf") for p in root.iterdir()
             if (m := _STEP.match(p.name)) and (p / "hf").is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoints(paths: Sequence[str | Path]) -> list[CheckpointRef]:
    """Checkpoint arguments -> checkpoints ordered by step (command-line order among equal steps).

    A run directory (it has ``checkpoints/step_<N>/hf``) stands for all its exports; any other
    directory is a checkpoint itself. A missing one is a CheckpointError (a FileNotFoundError).
    """
    from models.loading import CheckpointError  # here: importing it loads torch and transformers

    found: list[Path] = []
    for arg in paths:
        path = Path(arg).absolute()
        if not path.is_dir():
            raise CheckpointError(f"--checkpoint {arg}: no such directory")
        exports = run_exports(path)
        if exports:
            found.extend(exports)
        elif (path / "checkpoints").is_dir():
            raise CheckpointError(f"--checkpoint {arg}: run directory without exported checkpoints "
                                    "(checkpoints/step_<N>/hf)")
        else:
            found.append(path)
    refs, seen = [], {}
    for path in dict.fromkeys(found):  # the same directory twice is evaluated once
        name = _name_of(path)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # two different directories with the same name
            name = f"{name}-{seen[name]}"
        refs.append(CheckpointRef(name=name, path=path, step=_step_of(path)))
    return sorted(refs, key=lambda r: r.step)  # stable: ties keep their order


# --------------------------------------------------------------------------- distribution


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device of this rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_dist(device_setting: str) -> Dist:
    """This process's place: models.distributed's set-up under torchrun, else a plain single process.

    A single process joins no process group, so evaluation can be called from tests or tools
    without leaving one behind.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        if device_setting == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(device_setting)
        return Dist(device=device)
    from models.distributed import init_distributed

    info = init_distributed(device=None if device_setting == "auto" else device_setting)
    return Dist(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank, device=info.device)


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _broadcast(d: Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if d.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(d: Dist, value: Any) -> list[Any]:
    if d.world_size == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, value)
    return out


def resolve_dtype(setting: str, device):
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


# --------------------------------------------------------------------------- data


def load_samples(config: EvalConfig, d: Dist | None = None) -> list:
    """The benchmark's questions, in file order (the first ``data.limit`` when set)."""
    from data.datasets import read_dataset

    path = dataset_path(config)
    if config.data.format == "synthetic" and not path.exists() and config.data.synthetic_generate:
        _generate_synthetic(config, path, d or Dist())
    # a bad record or a repeated id stops here, naming the line, unless data.on_error=skip
    samples = read_dataset(config.data.format, str(path), audio_root=config.data.audio_root,
                           on_error=config.data.on_error)
    if config.data.limit:
        samples = samples[: config.data.limit]
    return samples


def _generate_synthetic(config: EvalConfig, path: Path, d: Dist) -> None:
    from data.synthetic import generate_synthetic

    if d.is_main:
        log.info("writing a synthetic evaluation set at %s", path)
        kwargs = dict(n=config.data.synthetic_size, seed=config.data.synthetic_seed,
                      difficulty=config.data.synthetic_difficulty, progress=config.output.progress_bar)
        if config.data.synthetic_tasks:
            kwargs["tasks"] = list(config.data.synthetic_tasks)
        written = generate_synthetic(path.parent, split=path.stem, **kwargs)
        if written is not None and Path(written) != path and not path.exists():
            raise ConfigError(f"generate_synthetic wrote {written}, not data.path {path}")
    _barrier(d)


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


# --------------------------------------------------------------------------- generation


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


def decode_greedy(tokenizer, completion_ids, end_ids: Sequence[int]) -> list[tuple[str, int, bool]]:
    """(text, n_tokens, truncated) per row: tokens before the first end token, specials dropped.

    ``skip_special_tokens=True`` as R1-AQA's test script decodes; the end token is found by
    position, never by comparing to the pad id.
    """
    rows = []
    ends = set(int(t) for t in end_ids)
    for row in completion_ids.tolist():
        cut = next((t for t, tok in enumerate(row) if tok in ends), None)
        body = row if cut is None else row[:cut]
        text = tokenizer.decode(body, skip_special_tokens=True)
        rows.append((text, len(row) if cut is None else cut + 1, cut is None))
    return rows


def generate_answers(
    model,
    processor,
    samples: Sequence,
    indices: Sequence[int],
    *,
    template: int,
    max_new_tokens: int,
    batch_size: int,
    device,
    end_ids: Sequence[int],
    pad_id: int,
    suppress_ids: Sequence[int],
    load_audio,
    on_batch=None,
    progress=None,
    on_error: str = "skip",
    max_prompt_tokens: int | None = None,
) -> list[Generated]:
    """Greedy completions for ``samples[i]`` for i in ``indices`` (any order in, same order out).

    Questions are sorted by estimated prompt length, longest first (an out-of-memory batch shows
    up at once), batched, and the results put back in the order of ``indices``.
    ``on_batch(list[Generated])`` is called after each batch (progress files).
    A clip that cannot be read, or a prompt longer than ``max_prompt_tokens``, raises
    (``on_error="raise"``: AudioError naming the file, DataError naming the sample) or gives a
    ``Generated`` with the reason in ``error`` (``"skip"``).
    """
    import torch

    from data.audio import AudioError
    from data.collate import collate_prompts
    from data.datasets import DataError
    from data.prompts import format_prompt
    from models.policy import generate, prompt_embeddings

    tokenizer = processor.tokenizer
    fe = processor.feature_extractor
    window, rate = fe.n_samples / fe.sampling_rate, fe.sampling_rate
    lengths = {}
    for i in indices:
        s = samples[i]
        text = format_prompt(s.question, s.choices, template)
        lengths[i] = prompt_length_estimate(s, len(tokenizer(text).input_ids), window)
    order = sorted(indices, key=lambda i: -lengths[i])
    out: dict[int, Generated] = {}
    for start in range(0, len(order), batch_size):
        batch_idx = order[start: start + batch_size]
        done: list[Generated] = []
        ok, waves = [], []
        for i in batch_idx:
            try:
                waves.append(load_audio(samples[i].audio_path))
                ok.append(i)
            except AudioError as err:
                if on_error != "skip":
                    raise
                done.append(Generated(index=i, error=str(err)))
        inputs = collate_prompts([samples[i] for i in ok], waves, processor, template=template,
                                 sampling_rate=rate) if ok else None
        if ok and max_prompt_tokens is not None:  # prompts are never cut: over-long ones are left out
            lengths = inputs["attention_mask"].sum(dim=1).tolist()
            fits = [n <= max_prompt_tokens for n in lengths]
            for i, n, fit in zip(ok, lengths, fits):
                if fit:
                    continue
                reason = (f"sample {samples[i].id} ({samples[i].audio_path}): its prompt is {n} tokens (text + "
                          f"audio), over the limit of {max_prompt_tokens}")
                if on_error != "skip":
                    raise DataError(f"{reason}. Prompts are never cut; data.on_error=skip leaves such "
                                    "questions out (counted)")
                done.append(Generated(index=i, error=reason))
            if not all(fits):
                ok, waves = [i for i, f in zip(ok, fits) if f], [w for w, f in zip(waves, fits) if f]
                inputs = collate_prompts([samples[i] for i in ok], waves, processor, template=template,
                                         sampling_rate=rate) if ok else None
        if ok:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                embeds = prompt_embeddings(model, inputs["input_ids"], inputs["attention_mask"],
                                           inputs["input_features"], inputs["feature_attention_mask"])
                ids = generate(model, embeds, inputs["attention_mask"], max_new_tokens=max_new_tokens,
                               end_token_ids=list(end_ids), pad_token_id=pad_id,
                               suppress_token_ids=list(suppress_ids), greedy=True)
            for i, (text, n_tok, cut) in zip(ok, decode_greedy(tokenizer, ids.cpu(), end_ids)):
                done.append(Generated(index=i, completion=text, n_tokens=n_tok, truncated=cut))
        for g in done:
            out[g.index] = g
        if on_batch is not None:
            on_batch(done)
        if progress is not None:
            progress.update(len(batch_idx))
    return [out[i] for i in indices]


# --------------------------------------------------------------------------- files


def _write_json(path: Path, value: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def weights_fingerprint(path: Path) -> list[list]:
    """``[name, size, mtime_ns]`` of every weights and config file of a checkpoint directory:
    new weights written at the same path change it (hashing 16 GB of weights would take minutes)."""
    wanted = (".safetensors", ".bin", ".json")
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir())
            if p.is_file() and p.name.endswith(wanted)]


def _fingerprint(config: EvalConfig, ckpt: CheckpointRef, samples: Sequence) -> dict:
    """What the generated text depends on: reuse predictions only when all of it matches."""
    ids = hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()[:16]
    return {
        "checkpoint": str(ckpt.path),
        "weights": weights_fingerprint(ckpt.path),
        "max_prompt_tokens": config.data.max_prompt_tokens,
        "dataset": str(dataset_path(config).absolute()),
        "n_questions": len(samples),
        "question_ids_sha256": ids,
        "prompt_template": config.data.prompt_template,
        "max_new_tokens": config.generation.max_new_tokens,
    }


def _read_progress(folder: Path) -> dict[int, Generated]:
    """Finished questions from the per-rank progress files (a torn last line is ignored)."""
    done: dict[int, Generated] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["index"]] = Generated(**row)
    return done


def previous_results(out_dir: Path, fingerprint: dict, samples: Sequence) -> dict[int, Generated] | None:
    """Outcomes stored in a complete earlier evaluation with the same fingerprint, else None."""
    info_path, pred_path = out_dir / "eval_info.json", out_dir / "predictions.json"
    if not (info_path.is_file() and pred_path.is_file()):
        return None
    try:
        info, records = _read_json(info_path), _read_json(pred_path)
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != fingerprint or len(records) != len(samples):
        return None
    errors = {m["index"]: m["error"] for m in info.get("missing_audio", [])}
    lengths = info.get("completion_tokens", [])
    truncated = set(info.get("truncated", []))
    results = {}
    for i, record in enumerate(records):
        if str(record.get("id")) != samples[i].id:
            return None
        if i in errors:
            results[i] = Generated(index=i, error=errors[i])
        elif "model_completion" in record and record["model_completion"] is not None:
            n_tok = lengths[i] if i < len(lengths) else 0
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


# --------------------------------------------------------------------------- tables


def format_scores_table(scores: dict, *, title: str = "", notes: Sequence[str] = ()) -> str:
    """The score dict as text: per task, per difficulty, per sub-category, then the total."""
    width = max([len(k) for group in ("task", "difficulty", "sub-category") for k in scores.get(group, {})]
                + [12])
    lines = [title] if title else []
    for group in ("task", "difficulty", "sub-category"):
        entries = scores.get(group) or {}
        if not entries:
            continue
        lines.append(f"  {group:<{width}}  {'correct':>7} / {'count':<5}  accuracy")
        for name, e in entries.items():
            lines.append(f"  {name:<{width}}  {e['correct']:>7} / {e['count']:<5}  {e['accuracy']:7.2f}%")
        lines.append("")
    t = scores["total"]
    lines.append(f"  {'total':<{width}}  {t['correct']:>7} / {t['count']:<5}  {t['accuracy']:7.2f}%")
    lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)


@dataclass
class CheckpointResult:
    checkpoint: CheckpointRef
    out_dir: Path
    scores: dict | None  # None for a benchmark without answers
    missing_audio: list[str]  # ids of the questions skipped (unreadable audio or over-long prompt)
    left_out: int  # questions left out of the scores (skip_missing_audio)
    reused: bool  # predictions reused from an earlier run


def format_summary(results: Sequence[CheckpointResult], dataset: str) -> str:
    """One row per checkpoint (by step): accuracy per task and total; the best total marked ``*``."""
    scored = [r for r in results if r.scores is not None]
    if not scored:
        return f"{dataset}: no answers in the benchmark, predictions only"
    tasks = ordered_groups({t for r in scored for t in r.scores["task"]}, "task")
    best = max(r.scores["total"]["accuracy"] for r in scored)
    name_w = max(len("checkpoint"), *(len(r.checkpoint.name) for r in scored))
    widths = {t: max(8, len(t)) for t in tasks}
    header = f"{'checkpoint':<{name_w}}  {'step':>6}  " + "  ".join(f"{t:>{widths[t]}}" for t in tasks)
    header += f"  {'total':>8}  {'count':>6}"
    lines = [f"{dataset}", header, "-" * len(header)]
    for r in scored:
        cells = [f"{r.scores['task'][t]['accuracy']:{widths[t]}.2f}" if t in r.scores["task"]
                 else f"{'-':>{widths[t]}}" for t in tasks]
        total = r.scores["total"]
        mark = " *" if total["accuracy"] == best and len(scored) > 1 else ""
        extra = f"  ({len(r.missing_audio)} skipped, {r.left_out} left out)" if r.missing_audio else ""
        lines.append(f"{r.checkpoint.name:<{name_w}}  {r.checkpoint.step:>6}  " + "  ".join(cells)
                     + f"  {total['accuracy']:8.2f}  {total['count']:>6}{mark}{extra}")
    if len(scored) > 1:
        lines.append("* best total")
    return "\n".join(lines)


def summary_json(results: Sequence[CheckpointResult], dataset: str, config: EvalConfig) -> dict:
    rows = []
    for r in results:
        rows.append({
            "checkpoint": r.checkpoint.name, "path": str(r.checkpoint.path), "step": r.checkpoint.step,
            "total": None if r.scores is None else r.scores["total"],
            "task": None if r.scores is None else r.scores["task"],
            "skipped_samples": len(r.missing_audio), "left_out": r.left_out,
            "predictions": str(r.out_dir / "predictions.json"),
        })
    scored = [row for row in rows if row["total"] is not None]
    best = max(scored, key=lambda row: row["total"]["accuracy"])["checkpoint"] if scored else None
    return {"dataset": dataset, "dataset_file": str(dataset_path(config)),
            "prompt_template": config.data.prompt_template,
            "max_new_tokens": config.generation.max_new_tokens, "best": best, "checkpoints": rows}


def write_tensorboard(results: Sequence[CheckpointResult], dataset: str, log_dir: Path) -> None:
    """``eval/<dataset>/<task>`` and ``eval/<dataset>/total`` at each checkpoint's step."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for r in results:
            if r.scores is None:
                continue
            for task, entry in r.scores["task"].items():
                writer.add_scalar(f"eval/{dataset}/{task}", entry["accuracy"], r.checkpoint.step)
            writer.add_scalar(f"eval/{dataset}/total", r.scores["total"]["accuracy"], r.checkpoint.step)
            writer.add_scalar(f"eval/{dataset}/skipped_samples", len(r.missing_audio), r.checkpoint.step)
    finally:
        writer.close()


# --------------------------------------------------------------------------- the loop


def _load_checkpoint(ckpt: CheckpointRef, config: EvalConfig, device):
    from models.loading import end_token_ids, load_generation_config, load_model, load_processor
    from models.policy import suppressed_token_ids

    dtype = resolve_dtype(config.model.dtype, device)
    model = load_model(str(ckpt.path), dtype=dtype, device=device)
    model.eval()
    processor = load_processor(str(ckpt.path))
    end_ids = sorted(end_token_ids(load_generation_config(str(ckpt.path))))
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    # structural tokens (<|AUDIO|> ...) and ids the tokenizer cannot decode are never produced
    suppress = suppressed_token_ids(tokenizer, vocab_size=model.config.text_config.vocab_size)
    return model, processor, end_ids, pad_id, suppress


def prompt_limit(config: EvalConfig, ckpt: CheckpointRef) -> int | None:
    """Longest prompt allowed: the model's context (config.json) minus max_new_tokens, or
    data.max_prompt_tokens when that is smaller; None when neither is known."""
    text_config = _read_json(ckpt.path / "config.json").get("text_config", {}) \
        if (ckpt.path / "config.json").is_file() else {}
    context = text_config.get("max_position_embeddings")
    limits = [config.data.max_prompt_tokens] if config.data.max_prompt_tokens else []
    if context:
        room = context - config.generation.max_new_tokens
        if room < 1:
            raise ConfigError(f"generation.max_new_tokens={config.generation.max_new_tokens} leaves no room for a "
                              f"prompt in the context of {context} tokens of {ckpt.path}")
        limits.append(room)
    return min(limits) if limits else None


def _generate_missing(config, ckpt, samples, fingerprint, out_dir, force, d: Dist) -> dict[int, Generated]:
    """Generate every question not in the progress files; returns all outcomes (rank 0)."""
    import torch

    from data.audio import AudioLoader

    progress_dir = out_dir / "progress"
    if d.is_main:
        marker = progress_dir / "fingerprint.json"
        stale = force or not marker.is_file() or _read_json(marker) != fingerprint
        if stale and progress_dir.exists():
            shutil.rmtree(progress_dir)
        _write_json(marker, fingerprint)
    _barrier(d)
    done = _read_progress(progress_dir)
    todo = [i for i in range(len(samples)) if i not in done]
    mine = todo[d.rank:: d.world_size]  # strided: every rank gets a similar mix of lengths
    if d.is_main and done:
        log.info("%s: %d of %d questions already answered (progress files), %d to go",
                 ckpt.name, len(done), len(samples), len(todo))

    new: list[Generated] = []
    if todo:
        device = d.device
        model, processor, end_ids, pad_id, suppress_ids = _load_checkpoint(ckpt, config, device)
        # the feature extractor's window (30 s for Qwen2-Audio): it drops audio beyond it anyway,
        # the loader cuts there and says so
        fe = processor.feature_extractor
        loader = AudioLoader(sampling_rate=fe.sampling_rate, max_seconds=fe.n_samples / fe.sampling_rate,
                             channel=config.data.audio_channel)
        progress_file = progress_dir / f"rank{d.rank}.jsonl"

        def save(batch: list[Generated]) -> None:
            with progress_file.open("a") as f:
                for g in batch:
                    f.write(json.dumps(g.to_json(), ensure_ascii=False) + "\n")

        bar = None
        if d.is_main and config.output.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(mine), desc=f"{ckpt.name} (rank 0 of {d.world_size})", unit="q",
                       file=sys.stderr, dynamic_ncols=True)
        try:
            new = generate_answers(
                model, processor, samples, mine, template=config.data.prompt_template,
                max_new_tokens=config.generation.max_new_tokens, batch_size=config.generation.batch_size,
                device=device, end_ids=end_ids, pad_id=pad_id, suppress_ids=suppress_ids,
                load_audio=loader, on_batch=save, progress=bar, on_error=config.data.on_error,
                max_prompt_tokens=prompt_limit(config, ckpt))
        finally:
            if bar is not None:
                bar.close()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gathered = _gather(d, [g.to_json() for g in new])
    if not d.is_main:
        return {}
    merged = dict(done)
    for rank_rows in gathered:
        for row in rank_rows:
            if row["index"] in merged and row["index"] not in done:
                raise RuntimeError(f"question {row['index']} answered by two ranks")
            merged[row["index"]] = Generated(**row)
    missing = sorted(set(range(len(samples))) - set(merged))
    if missing or len(merged) != len(samples):
        raise RuntimeError(f"{ckpt.name}: {len(missing)} questions without an outcome, e.g. {missing[:5]}")
    return merged


def evaluate_checkpoint(config: EvalConfig, ckpt: CheckpointRef, samples: Sequence, *,
                        force: bool = False, d: Dist | None = None) -> CheckpointResult | None:
    """Predictions, scores and tables of one checkpoint; returns the result on rank 0 (None elsewhere)."""
    d = d or init_dist(config.model.device)
    out_dir = output_dir(config) / ckpt.name
    fingerprint = _fingerprint(config, ckpt, samples)
    has_answers = any(s.answer is not None for s in samples)

    results = None if force or not d.is_main else previous_results(out_dir, fingerprint, samples)
    reused = _broadcast(d, results is not None)
    started = time.time()
    if not reused:
        results = _generate_missing(config, ckpt, samples, fingerprint, out_dir, force, d)
    if not d.is_main:
        _barrier(d)  # rank 0 writes the files before the next checkpoint starts
        return None

    ordered = [results[i] for i in range(len(samples))]
    errors = [g for g in ordered if g.error is not None]
    if errors and config.data.on_error != "skip":  # reused predictions made under data.on_error=skip
        from data.datasets import DataError

        raise DataError(f"{ckpt.name}: {len(errors)} question(s) could not be answered, first: {errors[0].error}; "
                        "set data.on_error=skip to count them (or fix them and rerun with --force)")
    skip = config.data.skip_missing_audio
    records = prediction_records(samples, ordered, skip_missing_audio=skip)
    info = {
        "fingerprint": fingerprint,
        "checkpoint": ckpt.name, "step": ckpt.step, "dataset_name": dataset_name(config),
        "skip_missing_audio": skip,
        "skipped_samples": len(errors),
        "missing_audio": [{"index": g.index, "id": samples[g.index].id, "error": g.error} for g in errors],
        "completion_tokens": [g.n_tokens for g in ordered],
        "truncated": [g.index for g in ordered if g.truncated],
        "generation_seconds": None if reused else round(time.time() - started, 1),
        "world_size": d.world_size,
    }
    _write_json(out_dir / "predictions.json", records)
    scores = None
    notes = []
    if errors:
        notes.append(f"skipped (unreadable audio or over-long prompt): {len(errors)} questions "
                     + ("left out of the scores" if skip else "counted wrong"))
    answered = [g for g in ordered if g.error is None]
    if answered:
        n_cut = sum(g.truncated for g in answered)
        notes.append(f"completions: mean {sum(g.n_tokens for g in answered) / len(answered):.1f} tokens, "
                     f"{n_cut} cut at max_new_tokens={config.generation.max_new_tokens}")
    if has_answers:
        report = score_report(records)
        scores = report.scores
        _write_json(out_dir / "scores.json", scores)
    else:
        _write_json(out_dir / "submission.json",
                    prediction_records(samples, ordered, skip_missing_audio=skip, submission=True))
    _write_json(out_dir / "eval_info.json", info)
    shutil.rmtree(out_dir / "progress", ignore_errors=True)  # complete: predictions.json replaces them

    title = (f"{ckpt.name} (step {ckpt.step}) on {dataset_name(config)}"
             f"{' [predictions reused]' if reused else ''}")
    if errors:
        shown = ", ".join(samples[g.index].id for g in errors[:20])
        log.warning("%s: %d questions skipped (unreadable audio or over-long prompt): %s%s", ckpt.name, len(errors),
                    shown, " ..." if len(errors) > 20 else "")
    if scores is not None:
        print(format_scores_table(scores, title=title, notes=notes), flush=True)
    else:
        print(f"{title}\n  no answers in the benchmark: predictions only, "
              f"submission file {out_dir / 'submission.json'}\n" + "\n".join(f"  {n}" for n in notes), flush=True)
    _barrier(d)
    return CheckpointResult(checkpoint=ckpt, out_dir=out_dir, scores=scores,
                            missing_audio=[samples[g.index].id for g in errors],
                            left_out=len(errors) if skip else 0, reused=reused)


def run_evaluation(config: EvalConfig, checkpoints: Sequence[str | Path], *, force: bool = False
                   ) -> list[CheckpointResult]:
    """Evaluate every checkpoint, then write the summary and TensorBoard scalars (rank 0)."""
    from models.loading import CheckpointError

    d = init_dist(config.model.device)
    refs = resolve_checkpoints(checkpoints)
    if not refs:
        raise CheckpointError(f"no checkpoints found in {list(checkpoints)}")
    samples = load_samples(config, d)
    if d.is_main:
        log.info("%s: %d questions from %s; %d checkpoint(s): %s", dataset_name(config), len(samples),
                 dataset_path(config), len(refs), ", ".join(f"{r.name} (step {r.step})" for r in refs))
    results = [evaluate_checkpoint(config, ref, samples, force=force, d=d) for ref in refs]
    if not d.is_main:
        return []
    out = output_dir(config)
    name = dataset_name(config)
    table = format_summary(results, name)
    print("\n" + table, flush=True)
    (out / "summary.txt").write_text(table + "\n")
    _write_json(out / "summary.json", summary_json(results, name, config))
    tb = tensorboard_dir(config)
    if tb is not None and any(r.scores is not None for r in results):
        write_tensorboard(results, name, tb)
    return results


def read_predictions(path: str | Path) -> list[dict]:
    """A benchmark-schema predictions file, every record checked: DataError naming the file and record."""
    from data.datasets import DataError
    from data.scoring import record_problem

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f"line {err.lineno} column {err.colno}: " if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}: {where}not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records to score")
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem is not None:
            named = f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else ""
            raise DataError(f"{path}: record {i}{named}: {problem}")
    return records


def score_file(predictions: str | Path, output: str | Path | None = None) -> dict:
    """Rescore any benchmark-schema predictions file; print the tables; write the scores JSON."""
    records = read_predictions(predictions)
    report = score_report(records)
    notes = [f"{len(report.no_prediction)} records without a prediction left out"] if report.no_prediction else []
    print(format_scores_table(report.scores, title=str(predictions), notes=notes), flush=True)
    if output is not None:
        _write_json(Path(output), report.scores)
    return report.scores

