"""Benchmark evaluation: greedy answers of one or more checkpoints, scored the MMAU way.

For each checkpoint (a transformers-format directory, or every ``checkpoints/step_<N>/hf``
export of a run directory):

1. every rank takes a strided shard of the questions not answered yet, sorts it by prompt
   length (similar lengths batch with little padding) and answers greedily
   (``grpo.rollout.greedy_answers``, the trainer's held-out path), appending each
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
total marked) and TensorBoard scalars ``eval/<dataset>/<task>`` and ``eval/<dataset>/total``
for the checkpoints whose predictions were made by this call (reused ones were written then).

A question whose audio is missing, undecodable or not finite, or whose prompt (text + audio
tokens) plus ``max_new_tokens`` does not fit the model's context (or ``data.max_prompt_tokens``),
stops the evaluation with an error naming it (``data.on_error: raise``, the default). With
``data.on_error: skip`` it is listed by id, counted (``skipped_samples``) and kept in the
predictions with an empty answer (counted wrong: the denominator stays the benchmark's); with
``data.skip_missing_audio`` as well, its record carries no prediction key, so the scorer leaves
it out, exactly as the official MMAU script does with unanswered records.

Predictions are reused only when the fingerprint matches: the weights files (names, sizes,
modification times) as well as the data, prompt and length settings.

Where each part lives: ``evaluation.config`` (the config), ``evaluation.answers`` (greedy
answers and their files), ``evaluation.report`` (tables, summary, TensorBoard), this module
(the sweep over checkpoints, one process or several).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from data.scoring import score_report
from evaluation.answers import (
    Generated,
    append_lines,
    generate_answers,
    prediction_records,
    previous_results,
    read_json,
    read_progress,
    remove_tree,
    weights_fingerprint,
    write_json,
)
from evaluation.config import (
    EvalConfig,
    dataset_name,
    dataset_path,
    output_dir,
    tensorboard_dir,
)
from evaluation.results import CheckpointRef, CheckpointResult
from evaluation.report import format_scores_table, format_summary, summary_json, write_tensorboard
from grpo import manifest
from grpo.checkpoint import STEP_DIR, list_exports, step_of
from grpo.config import ConfigError
from grpo.rollout import sampling_settings
from models.collectives import broadcast_object, gather_objects
from models.distributed import DistInfo, barrier, init_distributed
from models.loading import CheckpointError, resolve_dtype

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- checkpoints



def check_checkpoint_files(path: Path) -> None:
    """CheckpointError naming the file unless every file the evaluation reads is whole: the JSON
    files parse, each safetensors file is as long as its header says (``models.loading``), and,
    for a training run's export, each file has the size the run's manifest recorded. (Sizes
    only: checksumming every export of a sweep would cost more than it finds.)"""
    from models.loading import check_model_files

    check_model_files(path)
    step_dir = path.parent
    if path.name == "hf" and STEP_DIR.match(step_dir.name) and (step_dir / manifest.MANIFEST).is_file():
        try:
            problem = manifest.verify(step_dir, only=("hf",), checksums=False)
        except manifest.ManifestError as err:
            problem = str(err)
        if problem:
            raise CheckpointError(f"--checkpoint {path}: {problem}")


def _name_of(path: Path) -> str:
    """``runs/x/checkpoints/step_100/hf`` -> ``x-step_100``; any other directory -> its name."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if STEP_DIR.match(parts[i]):
            run = parts[i - 2] if i >= 2 and parts[i - 1] == "checkpoints" else (parts[i - 1] if i >= 1 else "")
            return f"{run}-{parts[i]}" if run else parts[i]
    return path.name



# what train.py writes into a run directory (a model directory has config.json instead)
_RUN_ENTRIES = ("checkpoints", "history.jsonl", "run.lock", "config.yaml")


def _is_run_dir(path: Path) -> bool:
    return not (path / "config.json").is_file() and any((path / name).exists() for name in _RUN_ENTRIES)


def resolve_checkpoints(paths: Sequence[str | Path]) -> list[CheckpointRef]:
    """Checkpoint arguments -> checkpoints ordered by step (command-line order among equal steps).

    A run directory (it has ``checkpoints/step_<N>/hf``) stands for all its exports; any other
    directory is a checkpoint itself. A missing one is a CheckpointError (a FileNotFoundError).
    """
    found: list[Path] = []
    for arg in paths:
        path = Path(arg).absolute()
        if not path.is_dir():
            raise CheckpointError(f"--checkpoint {arg}: no such directory")
        exports = list_exports(path)
        if exports:
            found.extend(exports)
        elif _is_run_dir(path):
            busy = " (a run is training in it now)" if (path / "run.lock").is_file() else ""
            raise CheckpointError(f"--checkpoint {arg}: the run has no export yet{busy}: no "
                                  f"{Path(arg) / 'checkpoints' / 'step_<N>' / 'hf'} (a run exports one at each "
                                  "checkpoint, checkpointing.every steps, and at its end)")
        else:
            found.append(path)
    refs, seen = [], {}
    for path in dict.fromkeys(found):  # the same directory twice is evaluated once
        name = _name_of(path)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # two different directories with the same name
            name = f"{name}-{seen[name]}"
        refs.append(CheckpointRef(name=name, path=path, step=step_of(path)))
    return sorted(refs, key=lambda r: r.step)  # stable: ties keep their order



# --------------------------------------------------------------------------- distribution


def init_dist(device_setting: str) -> DistInfo:
    """This process's place: models.distributed's set-up under torchrun, else a plain single process.

    A single process joins no process group, so evaluation can be called from tests or tools
    without leaving one behind.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not dist.is_initialized():
        if device_setting == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(device_setting)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return init_distributed(device=None if device_setting == "auto" else device_setting)


# --------------------------------------------------------------------------- data


def load_samples(config: EvalConfig, d: DistInfo | None = None) -> list:
    """The benchmark's questions, in file order (the first ``data.limit`` when set)."""
    from data.datasets import read_dataset

    path = dataset_path(config)
    if config.data.format == "synthetic" and not path.exists() and config.data.synthetic_generate:
        _generate_synthetic(config, path, is_main=d is None or d.is_main)
    # a bad record or a repeated id stops here, naming the line, unless data.on_error=skip
    samples = read_dataset(config.data.format, str(path), audio_root=config.data.audio_root,
                           on_error=config.data.on_error)
    if config.data.limit:
        samples = samples[: config.data.limit]
    return samples


def _generate_synthetic(config: EvalConfig, path: Path, *, is_main: bool) -> None:
    from data.synthetic import generate_synthetic

    if is_main:
        log.info("writing a synthetic evaluation set at %s", path)
        kwargs = dict(n=config.data.synthetic_size, seed=config.data.synthetic_seed,
                      difficulty=config.data.synthetic_difficulty, progress=config.output.progress_bar)
        if config.data.synthetic_tasks:
            kwargs["tasks"] = list(config.data.synthetic_tasks)
        written = generate_synthetic(path.parent, split=path.stem, **kwargs)
        if written is not None and Path(written) != path and not path.exists():
            raise ConfigError(f"generate_synthetic wrote {written}, not data.path {path}")
    barrier()



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


# --------------------------------------------------------------------------- the loop


def _load_checkpoint(ckpt: CheckpointRef, config: EvalConfig, device):
    """(model in eval mode, processor, SamplingSettings): the trainer's generation rule
    (``grpo.rollout.sampling_settings``) with the evaluation's completion limit."""
    from models.loading import load_generation_config, load_model, load_processor

    model = load_model(str(ckpt.path), dtype=resolve_dtype(config.model.dtype, device), device=device)
    model.eval()
    processor = load_processor(str(ckpt.path))
    settings = sampling_settings(processor.tokenizer, load_generation_config(str(ckpt.path)),
                                 max_new_tokens=config.generation.max_new_tokens)
    return model, processor, settings


def prompt_limit(config: EvalConfig, ckpt: CheckpointRef) -> int | None:
    """Longest prompt allowed: the model's context (config.json) minus max_new_tokens, or
    data.max_prompt_tokens when that is smaller; None when neither is known."""
    text_config = read_json(ckpt.path / "config.json").get("text_config", {}) \
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


def _generate_missing(config, ckpt, samples, fingerprint, out_dir, force, d: DistInfo) -> dict[int, Generated]:
    """Generate every question not in the progress files; returns all outcomes (rank 0).

    1. rank 0 clears progress files written for another fingerprint (or all, with ``force``);
    2. every rank reads what is done and answers its strided share of the rest (``_answer_share``);
    3. rank 0 gathers the new outcomes and merges them with the done ones (``_merge_outcomes``).
    """
    progress_dir = out_dir / "progress"
    if d.is_main:
        marker = progress_dir / "fingerprint.json"
        stale = force or not marker.is_file() or read_json(marker) != fingerprint
        if stale:
            remove_tree(progress_dir)
        write_json(marker, fingerprint)
    barrier()
    done = read_progress(progress_dir)
    todo = [i for i in range(len(samples)) if i not in done]
    mine = todo[d.rank:: d.world_size]  # strided: every rank gets a similar mix of lengths
    if d.is_main and done:
        log.info("%s: %d of %d questions already answered (progress files), %d to go",
                 ckpt.name, len(done), len(samples), len(todo))

    new = _answer_share(config, ckpt, samples, mine, progress_dir / f"rank{d.rank}.jsonl", d) if todo else []
    gathered = gather_objects([g.to_json() for g in new])
    if not d.is_main:
        return {}
    return _merge_outcomes(done, gathered, len(samples), ckpt.name)


def _answer_share(config, ckpt, samples, mine: list[int], progress_file: Path, d: DistInfo) -> list[Generated]:
    """This rank's questions ``mine`` answered by the checkpoint, each batch appended to
    ``progress_file`` as it completes; the model is dropped afterwards."""
    from data.audio import AudioLoader

    device = d.device
    model, processor, settings = _load_checkpoint(ckpt, config, device)
    # the feature extractor's window (30 s for Qwen2-Audio): it drops audio beyond it anyway,
    # the loader cuts there and says so
    fe = processor.feature_extractor
    loader = AudioLoader(sampling_rate=fe.sampling_rate, max_seconds=fe.n_samples / fe.sampling_rate,
                         channel=config.data.audio_channel)

    def save(batch: list[Generated]) -> None:
        append_lines(progress_file, [json.dumps(g.to_json(), ensure_ascii=False) for g in batch])

    bar = None
    if d.is_main and config.output.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"{ckpt.name} (rank 0 of {d.world_size})", unit="q",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        new = generate_answers(
            model, processor, samples, mine, template=config.data.prompt_template, settings=settings,
            batch_size=config.generation.batch_size, device=device, load_audio=loader, on_batch=save, progress=bar,
            on_error=config.data.on_error, max_prompt_tokens=prompt_limit(config, ckpt))
    finally:
        if bar is not None:
            bar.close()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return new


def _merge_outcomes(done: dict[int, Generated], gathered: list[list[dict]], n_samples: int,
                    name: str) -> dict[int, Generated]:
    """The done outcomes and every rank's new ones, checked: each question exactly once."""
    merged = dict(done)
    for rank_rows in gathered:
        for row in rank_rows:
            if row["index"] in merged and row["index"] not in done:
                raise RuntimeError(f"question {row['index']} answered by two ranks")
            merged[row["index"]] = Generated(**row)
    missing = sorted(set(range(n_samples)) - set(merged))
    if missing or len(merged) != n_samples:
        raise RuntimeError(f"{name}: {len(missing)} questions without an outcome, e.g. {missing[:5]}")
    return merged


def evaluate_checkpoint(config: EvalConfig, ckpt: CheckpointRef, samples: Sequence, *,
                        force: bool = False, d: DistInfo | None = None) -> CheckpointResult | None:
    """Predictions, scores and tables of one checkpoint; returns the result on rank 0 (None elsewhere)."""
    d = d or init_dist(config.model.device)
    out_dir = output_dir(config) / ckpt.name
    fingerprint = _fingerprint(config, ckpt, samples)
    results = None if force or not d.is_main else previous_results(out_dir, fingerprint, samples)
    reused = broadcast_object(results is not None)
    started = time.time()
    if not reused:
        results = _generate_missing(config, ckpt, samples, fingerprint, out_dir, force, d)
    result = None
    if d.is_main:
        seconds = None if reused else round(time.time() - started, 1)
        result = _write_results(config, ckpt, samples, results, fingerprint, out_dir, reused, seconds, d.world_size)
    barrier()  # rank 0 writes the files before the next checkpoint starts
    return result


def _write_results(config: EvalConfig, ckpt: CheckpointRef, samples: Sequence, results: dict[int, Generated],
                   fingerprint: dict, out_dir: Path, reused: bool, seconds: float | None,
                   world_size: int) -> CheckpointResult:
    """Rank 0: predictions.json, scores.json (or submission.json), eval_info.json, the tables."""
    has_answers = any(s.answer is not None for s in samples)
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
        "generation_seconds": seconds,
        "world_size": world_size,
    }
    write_json(out_dir / "predictions.json", records)
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
        write_json(out_dir / "scores.json", scores)
    else:
        write_json(out_dir / "submission.json",
                   prediction_records(samples, ordered, skip_missing_audio=skip, submission=True))
    write_json(out_dir / "eval_info.json", info)
    remove_tree(out_dir / "progress")  # complete: predictions.json replaces them

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
    return CheckpointResult(checkpoint=ckpt, out_dir=out_dir, scores=scores,
                            missing_audio=[samples[g.index].id for g in errors],
                            left_out=len(errors) if skip else 0, reused=reused)


def run_evaluation(config: EvalConfig, checkpoints: Sequence[str | Path], *, force: bool = False
                   ) -> list[CheckpointResult]:
    """Evaluate every checkpoint, then write the summary and TensorBoard scalars (rank 0)."""
    from models.loading import CheckpointError

    from data.datasets import DataError
    from grpo.cli import alike_on_every_rank

    # what a user can fix, before the process group: every rank stops alike and one reports it
    with alike_on_every_rank():
        refs = resolve_checkpoints(checkpoints)
        if not refs:
            raise CheckpointError(f"no checkpoints found in {list(checkpoints)}")
        path = dataset_path(config)
        if not path.exists() and not (config.data.format == "synthetic" and config.data.synthetic_generate):
            raise DataError(f"data.path {path}: file not found")
        for ref in refs:  # a broken one is named now, not after hours spent on the ones before it
            check_checkpoint_files(ref.path)
    d = init_dist(config.model.device)
    with alike_on_every_rank():  # every rank reads the same file
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
    write_json(out / "summary.json", summary_json(results, name, config))
    tb = tensorboard_dir(config)
    fresh = [r for r in results if r.scores is not None and not r.reused]  # reused ones are in tb/ already
    if tb is not None and fresh:
        write_tensorboard(fresh, name, tb)
    return results
