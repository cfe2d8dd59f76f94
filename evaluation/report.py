"""Reports of an evaluation: score tables, the summary across checkpoints, TensorBoard, and the
rescoring of any predictions file (``evaluate.py --score-only``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data.scoring import ordered_groups, read_predictions, score_report
from evaluation.answers import write_json
from evaluation.config import EvalConfig, dataset_path
from evaluation.results import CheckpointResult


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



def score_file(predictions: str | Path, output: str | Path | None = None) -> dict:
    """Rescore any benchmark-schema predictions file; print the tables; write the scores JSON."""
    records = read_predictions(predictions)
    report = score_report(records)
    notes = [f"{len(report.no_prediction)} records without a prediction left out"] if report.no_prediction else []
    print(format_scores_table(report.scores, title=str(predictions), notes=notes), flush=True)
    if output is not None:
        write_json(Path(output), report.scores)
    return report.scores

