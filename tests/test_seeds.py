"""benchmarks/seeds.py: the seed list it parses and what it reads off a run's history."""

from benchmarks import seeds


def test_parse_seeds():
    assert seeds.parse_seeds("0-9") == list(range(10))
    assert seeds.parse_seeds("0,3,5") == [0, 3, 5]
    assert seeds.parse_seeds("2-4,7") == [2, 3, 4, 7]


def _eval(step, phase, overall, pitch, tone):
    return {"step": step, "train/phase": phase, "eval/greedy_accuracy": overall,
            "eval/greedy_accuracy/pitch": pitch, "eval/greedy_accuracy/tone": tone}


def test_summarize_reads_the_last_eval_and_the_first_grpo_step_at_the_threshold():
    history = [
        {"step": 1, "train/phase": 0.0},  # a step without evaluation is ignored
        _eval(50, 0.0, 0.96, 1.0, 0.9),  # the warm-up's evaluation never counts as reaching it
        _eval(100, 0.0, 0.5, 0.4, 0.6),
        _eval(150, 1.0, 0.7, 0.4, 1.0),
        _eval(200, 1.0, 0.95, 0.9, 1.0),
        _eval(250, 1.0, 0.9, 0.8, 1.0),  # fell back: the final number is what the run ends with
    ]
    s = seeds.summarize(history, ["pitch", "tone"])
    assert s["final"] == 0.9
    assert s["tasks"] == {"pitch": 0.8, "tone": 1.0}
    assert s["first_step_at_threshold"] == 200
    assert s["warmup_end"] == 0.5
    assert s["steps"] == 250


def test_summarize_of_a_run_that_never_reaches_the_threshold():
    s = seeds.summarize([_eval(100, 0.0, 0.5, 0.5, 0.5), _eval(200, 1.0, 0.7, 0.4, 1.0)], ["pitch", "tone"])
    assert s["first_step_at_threshold"] is None and s["final"] == 0.7
