"""benchmarks/study.py's bookkeeping and benchmarks/png.py's renderer (the training runs are the study's own)."""

import numpy as np
import pytest

from benchmarks.png import line_panels, write_png
from benchmarks.study import VARIANTS, split_scores, tables
from data.suite import SKILLS

PIL = pytest.importorskip("PIL.Image")


def test_write_png_round_trips_through_a_decoder(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", rgb)
    assert np.array_equal(np.asarray(PIL.open(tmp_path / "x.png").convert("RGB")), rgb)


def test_line_panels_draws_each_series_in_its_colour(tmp_path):
    red, blue = (210, 50, 40), (40, 90, 200)
    panels = [("A", {"g": (red, [(64, 0.2, 0.1, 0.3), (256, 0.8, 0.7, 0.9)])}),
              ("B", {"s": (blue, [(64, 0.5, 0.5, 0.5), (256, 0.5, 0.4, 0.6)])})]
    line_panels(panels, tmp_path / "p.png", width=200, height=150)
    img = np.asarray(PIL.open(tmp_path / "p.png").convert("RGB"))
    assert img.shape == (150, 400, 3)
    is_red, is_blue = (img == red).all(-1), (img == blue).all(-1)
    assert is_red[:, :200].any() and not is_red[:, 200:].any()  # each series in its own panel
    assert is_blue[:, 200:].any() and not is_blue[:, :200].any()
    rows = np.flatnonzero(is_red.any(1))
    assert rows.max() - rows.min() > 50  # the GRPO curve rises from 0.2 to 0.8: it spans the panel


def _row(id_acc, shift_acc):
    row = {f"eval/greedy_accuracy/id/{s}": id_acc for s in SKILLS}
    row.update({f"eval/greedy_accuracy/shift/{s}": shift_acc for s in SKILLS})
    row["eval/greedy_accuracy/id/count"] = id_acc + 0.09  # overall is the mean over skills
    return row


def test_split_scores_are_the_mean_over_skills_per_split():
    s = split_scores(_row(0.5, 0.25))
    assert s["id"] == pytest.approx(0.5 + 0.09 / len(SKILLS))
    assert s["shift"] == pytest.approx(0.25) and s["id/count"] == pytest.approx(0.59)


def test_the_table_pairs_grpo_and_sft_by_seed():
    def run(name, seed, acc):
        return {"group": "main", "name": name, "n": 64, "seed": seed, "scores": split_scores(_row(acc, acc)),
                "wall_s": 1.0, "step_s": 1.0}
    p = {"sizes": [64], "variant_n": 64}
    text = tables([run("sft", 0, 0.3), run("sft", 1, 0.5), run("grpo", 0, 0.4), run("grpo", 1, 0.5)], p)
    diff_row = [line for line in text.splitlines() if line.startswith("| 64 | 0.")][0]
    assert "0.05 (0.00-0.10)" in diff_row  # per seed: +0.10 and +0.00, not the means' gap of all pairs
    assert set(VARIANTS) >= {"grpo", "dr_grpo", "dapo", "gspo", "cispo", "gmpo", "sapo"}
