"""evaluate.py / the evaluation package on CPU: a tiny Qwen2-Audio, synthetic questions, MMAU records.

Two kinds of model:
* the real tiny model (models.tiny) for the end-to-end paths: generation, resume, torchrun;
* a stand-in whose "generation" answers the last choice printed in the prompt, for the
  bookkeeping (batching, order, missing audio, benchmark schemas) without any numerics.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
import evaluation.sweep as ev
import grpo.rollout as rollout
from data.scoring import extract_answer
from data.synthetic import generate_synthetic, synthetic_corpus
from evaluation.config import load_eval_config
from grpo.config import ConfigError
from models.loading import end_token_ids, load_generation_config, load_processor
from models.tiny import build_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
MMAU_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmau" / "mmau-test-mini.2024-12.json"
N_QUESTIONS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0, corpus=synthetic_corpus())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic(out, n=N_QUESTIONS, seed=1, tasks=["pitch", "tone_or_noise"], split="eval",
                              progress=False)


def make_config(path, out_dir, *overrides, fmt="synthetic"):
    """An EvalConfig through the real loader (a YAML file plus overrides)."""
    yaml_path = Path(out_dir).with_suffix(".yaml")
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(
        f"data: {{format: {fmt}, path: '{path}', name: testset}}\n"
        "generation: {max_new_tokens: 4, batch_size: 4}\n"
        "model: {dtype: float32, device: cpu}\n"
        f"output: {{dir: '{out_dir}', progress_bar: false}}\n")
    return load_eval_config(yaml_path, list(overrides))


def read(path):
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- stand-in model


@pytest.fixture
def last_choice_model(monkeypatch, tiny):
    """Replace model loading and generation: each prompt is answered with its last choice."""
    processor = load_processor(tiny)
    tok = processor.tokenizer
    end_ids = end_token_ids(load_generation_config(tiny))
    pad_id = tok.pad_token_id
    calls = {"loads": 0, "batches": []}

    def fake_load(ckpt, config, device):
        calls["loads"] += 1
        return None, processor, rollout.SamplingSettings(max_new_tokens=config.generation.max_new_tokens,
                                                         end_token_ids=end_ids, pad_token_id=pad_id,
                                                         suppress_token_ids=[])

    def fake_embeddings(model, input_ids, input_features, feature_attention_mask, **kwargs):
        return input_ids  # the "embeddings" are the ids, so generate can read the prompt back

    def fake_generate(model, embeds, mask, *, max_new_tokens, end_token_ids, pad_token_id, **kwargs):
        assert kwargs["greedy"] is True
        calls["batches"].append(embeds.shape[0])
        rows = []
        for ids, m in zip(embeds, mask):
            text = tok.decode(ids[m.bool()].tolist())
            choices = ast.literal_eval(re.search(r"options: (\[.*?\])\.", text).group(1))
            rows.append(tok(f"<answer>{choices[-1]}</answer>").input_ids + [end_token_ids[0]])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])

    monkeypatch.setattr(ev, "_load_checkpoint", fake_load)
    monkeypatch.setattr(rollout, "prompt_embeddings", fake_embeddings)
    monkeypatch.setattr(rollout, "generate", fake_generate)
    return calls


def write_placeholder_audio(records, root, skip=()):
    for r in records:
        if r["id"] in skip:
            continue
        path = root / r["audio_id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, 0.1 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32), 16000)


@pytest.fixture
def mmau_subset(tmp_path):
    """Eight MMAU test-mini records over the three tasks, with placeholder audio."""
    if not MMAU_FILE.is_file():
        pytest.skip(f"MMAU test-mini not found at {MMAU_FILE}")
    records = read(MMAU_FILE)
    subset = [r for task, n in (("sound", 3), ("music", 3), ("speech", 2))
              for r in [r for r in records if r["task"] == task][:n]]
    path = tmp_path / "mmau" / "mmau-test-mini.json"
    path.parent.mkdir()
    path.write_text(json.dumps(subset))
    write_placeholder_audio(subset, path.parent)
    return path, subset


def test_batching_restores_order_and_missing_audio_is_counted_wrong(tmp_path, mmau_subset, last_choice_model,
                                                                     tiny):
    path, records = mmau_subset
    missing = records[4]["id"]
    (path.parent / records[4]["audio_id"]).unlink()
    runs = {}
    for batch in (1, 3, 8):
        config = make_config(path, tmp_path / f"b{batch}", f"generation.batch_size={batch}", "data.on_error=skip",
                             fmt="mmau")
        last_choice_model["batches"].clear()
        [result] = ev.run_evaluation(config, [tiny])
        # the clip that cannot be read drops out of its batch; every other question is generated once
        assert max(last_choice_model["batches"]) <= batch and sum(last_choice_model["batches"]) == len(records) - 1
        runs[batch] = read(result.out_dir / "predictions.json")
    assert runs[1] == runs[3] == runs[8]
    preds = runs[1]
    assert [p["id"] for p in preds] == [r["id"] for r in records]  # the benchmark's order
    for p, r in zip(preds, records):
        assert {k: p[k] for k in r} == r  # the original record, untouched
        if r["id"] == missing:
            assert p["model_output"] == p["model_prediction"] == "" and p["model_completion"] is None
        else:
            assert p["model_output"] == p["model_prediction"] == r["choices"][-1]
            assert p["model_completion"] == f"<answer>{r['choices'][-1]}</answer>"

    scores = read(result.out_dir / "scores.json")
    expected = sum(r["answer"] == r["choices"][-1] for r in records if r["id"] != missing)
    assert scores["total"] == {"correct": expected, "count": len(records),
                               "accuracy": round(100 * expected / len(records), 2)}
    assert set(scores["task"]) == {"sound", "music", "speech"}
    assert sum(e["count"] for e in scores["sub-category"].values()) == len(records)
    info = read(result.out_dir / "eval_info.json")
    assert [m["id"] for m in info["missing_audio"]] == [missing]
    assert result.missing_audio == [missing] and result.left_out == 0

    # skip_missing_audio: same generations (reused), the record loses its prediction keys
    config = make_config(path, tmp_path / "b8", "generation.batch_size=8", "data.on_error=skip",
                         "data.skip_missing_audio=true", fmt="mmau")
    loads = last_choice_model["loads"]
    [skipped] = ev.run_evaluation(config, [tiny])
    assert skipped.reused and last_choice_model["loads"] == loads
    preds = read(skipped.out_dir / "predictions.json")
    assert "model_output" not in preds[4] and "model_prediction" not in preds[4]
    scores = read(skipped.out_dir / "scores.json")
    assert scores["total"]["count"] == len(records) - 1 and scores["total"]["correct"] == expected
    assert skipped.left_out == 1
    assert "1 skipped, 1 left out" in (skipped.out_dir.parent / "summary.txt").read_text()


def test_benchmark_without_answers_gives_predictions_only(tmp_path, mmau_subset, last_choice_model, tiny):
    path, records = mmau_subset
    for r in records:
        del r["answer"]
    path.write_text(json.dumps(records))
    config = make_config(path, tmp_path / "out", fmt="mmau")
    [result] = ev.run_evaluation(config, [tiny])
    assert result.scores is None
    assert not (result.out_dir / "scores.json").exists()
    submission = read(result.out_dir / "submission.json")
    assert [s["id"] for s in submission] == [r["id"] for r in records]
    assert all(set(s) == set(r) | {"model_prediction", "model_output"} for s, r in zip(submission, records))
    assert not (tmp_path / "out" / "tb").exists()
    assert "predictions only" in (tmp_path / "out" / "summary.txt").read_text()


# --------------------------------------------------------------------------- the tiny model


def test_end_to_end_resume_force_and_score_only(tmp_path, tiny, synthetic, capsys, monkeypatch):
    config = make_config(synthetic, tmp_path / "out")
    [first] = ev.run_evaluation(config, [tiny])
    out = first.out_dir
    assert out == tmp_path / "out" / "model" and not first.reused
    preds = read(out / "predictions.json")
    source = [json.loads(line) for line in Path(synthetic).read_text().splitlines()]
    assert len(preds) == N_QUESTIONS
    for p, s in zip(preds, source):
        assert {k: p[k] for k in s} == s
        assert isinstance(p["model_completion"], str)
        assert p["model_output"] == p["model_prediction"] == extract_answer(p["model_completion"])
    scores = read(out / "scores.json")
    assert list(scores) == ["total", "task", "difficulty", "sub-category"]
    assert scores["total"]["count"] == N_QUESTIONS
    assert set(scores["task"]) == {"pitch", "tone_or_noise"} and set(scores["difficulty"]) == {"easy"}
    assert all(set(e) == {"correct", "count", "accuracy"} for e in scores["task"].values())
    summary = read(tmp_path / "out" / "summary.json")
    assert summary["checkpoints"][0]["total"] == scores["total"] and summary["best"] == "model"
    printed = capsys.readouterr().out
    assert "total" in printed and "pitch" in printed
    assert not (out / "progress").exists()

    # resumable: a second run reuses the predictions without loading the model
    def no_model(*args, **kwargs):
        raise AssertionError("the model should not be loaded")

    with monkeypatch.context() as m:
        m.setattr(ev, "_load_checkpoint", no_model)
        [second] = ev.run_evaluation(config, [tiny])
    assert second.reused and read(out / "predictions.json") == preds
    # a different generation setting is a different evaluation: regenerated
    [longer] = ev.run_evaluation(make_config(synthetic, tmp_path / "out", "generation.max_new_tokens=5"), [tiny])
    assert not longer.reused
    # --force regenerates, through the command line; greedy decoding gives the same answers
    (out / "predictions.json").write_text("[]")  # force must not read it
    assert evaluate.main(["--config", str(tmp_path / "out.yaml"), "--checkpoint", str(tiny), "--force"]) == 0
    assert read(out / "predictions.json") == preds

    # --score-only rescoring of the predictions equals the scores written with them
    assert evaluate.main(["--score-only", str(out / "predictions.json"),
                          "--output", str(tmp_path / "rescored.json")]) == 0
    assert read(tmp_path / "rescored.json") == scores


def test_progress_files_resume_an_interrupted_evaluation(tmp_path, tiny, synthetic, monkeypatch):
    config = make_config(synthetic, tmp_path / "out", "generation.batch_size=2")
    [reference] = ev.run_evaluation(config, [tiny])
    preds = read(reference.out_dir / "predictions.json")
    shutil.rmtree(tmp_path / "out")

    # die after the first batch: its answers are in the progress file
    real = ev.generate_answers

    def dying(*args, on_batch, **kwargs):
        def once(batch):
            on_batch(batch)
            raise KeyboardInterrupt

        return real(*args, on_batch=once, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(ev, "generate_answers", dying)
        with pytest.raises(KeyboardInterrupt):
            ev.run_evaluation(config, [tiny])
    progress = tmp_path / "out" / "model" / "progress" / "rank0.jsonl"
    assert len(progress.read_text().splitlines()) == 2

    asked = []

    def counting(model, processor, samples, indices, **kwargs):
        asked.extend(indices)
        return real(model, processor, samples, indices, **kwargs)

    monkeypatch.setattr(ev, "generate_answers", counting)
    [resumed] = ev.run_evaluation(config, [tiny])
    assert len(asked) == N_QUESTIONS - 2
    assert read(resumed.out_dir / "predictions.json") == preds


def test_run_directory_summary_and_tensorboard(tmp_path, tiny, synthetic):
    run = tmp_path / "runs" / "exp"
    for step in (20, 10):
        shutil.copytree(tiny, run / "checkpoints" / f"step_{step}" / "hf")
    (run / "checkpoints" / ".tmp_step_30" / "hf").mkdir(parents=True)  # an unfinished save: ignored
    config = make_config(synthetic, tmp_path / "out", "generation.max_new_tokens=2")
    results = ev.run_evaluation(config, [run, tiny])
    assert [(r.checkpoint.name, r.checkpoint.step) for r in results] == [
        ("model", 0), ("exp-step_10", 10), ("exp-step_20", 20)]
    summary = read(tmp_path / "out" / "summary.json")
    assert [row["step"] for row in summary["checkpoints"]] == [0, 10, 20]
    table = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    rows = [line for line in table if line.startswith(("model", "exp-"))]
    assert len(rows) == 3 and "pitch" in table[1] and "total" in table[1]
    assert sum(line.endswith(" *") for line in rows) >= 1  # equal weights: every row is best

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/testset/total", "eval/testset/pitch", "eval/testset/tone_or_noise"} <= tags
    totals = {e.step: e.value for e in acc.Scalars("eval/testset/total")}
    assert set(totals) == {0, 10, 20}
    assert totals[10] == pytest.approx(results[1].scores["total"]["accuracy"])

    shutil.copytree(tiny, run / "checkpoints" / "step_30" / "hf")
    again = ev.run_evaluation(config, [run, tiny])  # three reused, one new: only the new one is written
    assert [r.reused for r in again] == [True, True, True, False]
    acc = EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    assert sorted(e.step for e in acc.Scalars("eval/testset/total")) == [0, 10, 20, 30]  # each point once


@pytest.mark.slow
def test_two_processes_give_the_same_predictions_as_one(tmp_path, tiny, synthetic):
    config = make_config(synthetic, tmp_path / "one")
    [one] = ev.run_evaluation(config, [tiny])
    make_config(synthetic, tmp_path / "two")
    yaml_two = tmp_path / "two.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")  # the CPU, asked for
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "evaluate.py"), "--config", str(yaml_two), "--checkpoint", str(tiny)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = read(tmp_path / "two" / "model" / "eval_info.json")
    assert info["world_size"] == 2
    assert read(tmp_path / "two" / "model" / "predictions.json") == read(one.out_dir / "predictions.json")
    assert read(tmp_path / "two" / "model" / "scores.json") == read(one.out_dir / "scores.json")


# --------------------------------------------------------------------------- pieces


def test_checkpoint_names_and_steps(tmp_path):
    base = tmp_path / "Qwen2-Audio-7B-Instruct"
    base.mkdir()
    export = tmp_path / "runs" / "r1" / "checkpoints" / "step_300" / "hf"
    export.mkdir(parents=True)
    [b, e] = ev.resolve_checkpoints([export, base])
    assert (b.name, b.step) == ("Qwen2-Audio-7B-Instruct", 0)
    assert (e.name, e.step) == ("r1-step_300", 300)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ev.resolve_checkpoints([tmp_path / "nope"])
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"the run has no export yet: no .*empty_run/checkpoints/step_<N>/hf"):
        ev.resolve_checkpoints([tmp_path / "empty_run"])
    # a run still training, before its first checkpoint: no checkpoints/ folder yet
    training = tmp_path / "training_run"
    training.mkdir()
    for name in ("config.yaml", "history.jsonl", "run.lock"):
        (training / name).write_text("")
    with pytest.raises(FileNotFoundError, match=r"has no export yet \(a run is training in it now\): no "
                                                r".*training_run/checkpoints/step_<N>/hf"):
        ev.resolve_checkpoints([training])


def test_config_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("data: {format: mmau, path: x.json, prompt_templat: 2}\n")
    with pytest.raises(ConfigError, match=r"data\.prompt_templat.*eval\.yaml.*prompt_template"):
        load_eval_config(path)
    path.write_text("data: {format: mmau, path: 'mmau-test-mini.{version}.json'}\n")
    with pytest.raises(ConfigError, match="data.version"):
        load_eval_config(path)
    config = load_eval_config(path, ["data.version=v05.15.25"])
    assert ev.dataset_path(config).name == "mmau-test-mini.v05.15.25.json"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("eval_*.yaml")))
def test_shipped_configs_load(name):
    config = load_eval_config(REPO / "configs" / name)
    assert config.data.path
    if name == "eval_mmau_testmini.yaml":
        assert ev.dataset_path(config).name == "mmau-test-mini.2024-12.json"
        other = load_eval_config(REPO / "configs" / name, ["data.version=v05.15.25"])
        assert ev.dataset_path(other).name == "mmau-test-mini.v05.15.25.json"
        assert ev.output_dir(other) != ev.output_dir(config)


# --------------------------------------------------------------------------- when things go wrong


def test_an_unreadable_clip_stops_the_evaluation_naming_the_file(tmp_path, mmau_subset, last_choice_model, tiny):
    from data.audio import AudioError

    path, records = mmau_subset
    (path.parent / records[4]["audio_id"]).unlink()
    with pytest.raises(AudioError, match=re.escape(records[4]["audio_id"].lstrip("./")) + ": audio file not found"):
        ev.run_evaluation(make_config(path, tmp_path / "out", fmt="mmau"), [tiny])
    # skip: counted, logged and in the files
    [result] = ev.run_evaluation(make_config(path, tmp_path / "out", "data.on_error=skip", fmt="mmau"), [tiny])
    assert read(result.out_dir / "eval_info.json")["skipped_samples"] == 1
    assert read(tmp_path / "out" / "summary.json")["checkpoints"][0]["skipped_samples"] == 1
    # predictions made under skip are not silently reused under raise
    with pytest.raises(Exception, match="could not be answered.*data.on_error=skip"):
        ev.run_evaluation(make_config(path, tmp_path / "out", fmt="mmau"), [tiny])


def test_an_over_long_prompt_is_an_error_or_a_counted_skip(tmp_path, mmau_subset, last_choice_model, tiny):
    from data.datasets import DataError

    from data.collate import prompt_length

    path, records = mmau_subset
    processor = load_processor(tiny)
    samples = ev.load_samples(make_config(path, tmp_path / "out", fmt="mmau"))
    lengths = sorted(prompt_length(s, 16000, processor, template=2) for s in samples)  # 1 s placeholder clips
    limit = lengths[len(lengths) // 2]  # some prompts fit, the longer ones do not
    assert lengths[0] <= limit < lengths[-1]
    with pytest.raises(DataError, match=rf"sample .*: its prompt is \d+ tokens \(text \+ audio\), over the limit "
                                        rf"of {limit}"):
        ev.run_evaluation(make_config(path, tmp_path / "out", f"data.max_prompt_tokens={limit}", fmt="mmau"), [tiny])
    [result] = ev.run_evaluation(make_config(path, tmp_path / "out", f"data.max_prompt_tokens={limit}",
                                             "data.on_error=skip", fmt="mmau"), [tiny])
    info = read(result.out_dir / "eval_info.json")
    assert info["skipped_samples"] == sum(n > limit for n in lengths)
    assert all(f"over the limit of {limit}" in m["error"] for m in info["missing_audio"])
    # the context is the model's: max_new_tokens that leave no room is a config error
    with pytest.raises(ConfigError, match="generation.max_new_tokens=4096 leaves no room"):
        ev.run_evaluation(make_config(path, tmp_path / "full", "generation.max_new_tokens=4096", fmt="mmau"), [tiny])


def test_new_weights_at_the_same_path_are_not_reused(tmp_path, synthetic, last_choice_model, tiny):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    config = make_config(synthetic, tmp_path / "out")
    [first] = ev.run_evaluation(config, [model])
    [again] = ev.run_evaluation(config, [model])
    assert not first.reused and again.reused
    [weights] = list(model.glob("*.safetensors"))
    tensors = load_file(weights)
    save_file({k: v + 1.0 for k, v in tensors.items()}, weights, metadata={"format": "pt"})  # same size
    later = weights.stat().st_mtime_ns + 1_000_000_000  # a later write, whatever the clock resolution
    os.utime(weights, ns=(later, later))
    [after] = ev.run_evaluation(config, [model])
    assert not after.reused


@pytest.mark.parametrize("content, message", [
    ("[{\"id\": 1,", r"line 1 column \d+: not valid JSON"),
    ("{\"id\": 1}", "expected a JSON list of records, got a dict"),
    ("[]", "no records to score"),
    ('[{"id": "q1", "choices": "abc", "answer": "a", "model_output": "a"}]',
     r"record 0 \(id 'q1'\): 'choices' must be a non-empty list of strings, got 'abc'"),
    ('[{"id": "q1", "choices": ["a", "b"], "answer": "a"}, 7]', "record 1: a int, not an object"),
    ('[{"id": "q2", "choices": ["a", "b"], "model_output": "a"}]', r"record 0 \(id 'q2'\): no 'answer'"),
])
def test_score_only_names_the_file_and_record_of_a_malformed_predictions_file(tmp_path, capsys, content, message):
    path = tmp_path / "predictions.json"
    path.write_text(content)
    assert evaluate.main(["--score-only", str(path)]) == 1
    err = capsys.readouterr().err
    assert re.search(f"error: {re.escape(str(path))}: {message}", err), err
    assert "Traceback" not in err
    with pytest.raises(Exception, match=message):
        evaluate.main(["--score-only", str(path), "--debug"])


def _readme_commands(script: str) -> list[list[str]]:
    """The README's command lines that run ``script``, as argument lists after the script."""
    import shlex

    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if script in words:
                commands.append(words[words.index(script) + 1:])
    return commands


def test_the_readme_evaluate_commands_parse_as_written():
    commands = _readme_commands("evaluate.py")
    assert len(commands) >= 4, commands
    with_overrides = 0
    for argv in commands:
        args, overrides = evaluate.parse_args(argv)
        assert all("=" not in c for c in args.checkpoint), argv  # no override read as a checkpoint
        assert overrides == [a for a in argv if re.match(r"^\w+\.\w+=", a)]
        if not args.score_only:
            config = load_eval_config(REPO / args.config, overrides)
            with_overrides += bool(overrides)
            if "data.version=v05.15.25" in overrides:
                assert ev.dataset_path(config).name == "mmau-test-mini.v05.15.25.json"
    assert with_overrides, "the README shows no evaluate command with an override after --checkpoint"


def test_the_readme_train_commands_parse_as_written():
    import train
    from grpo.config import load_config

    commands = _readme_commands("train.py")
    assert len(commands) >= 4, commands
    for argv in commands:
        args, overrides = train.parse_args(argv)
        assert args.resume is None or "=" not in args.resume, argv
        cfg = load_config(REPO / args.config, overrides, require_paths=True)
        for override in overrides:
            key, value = override.split("=", 1)
            section, name = key.split(".")
            assert str(getattr(getattr(cfg, section), name)) == value


def test_overrides_after_an_option_with_values_are_still_overrides():
    args, overrides = evaluate.parse_args(["--config", "c.yaml", "--checkpoint", "a", "runs/lr=1e-6",
                                           "data.version=x", "b"])
    assert args.checkpoint == ["a", "runs/lr=1e-6", "b"] and overrides == ["data.version=x"]


def test_a_missing_checkpoint_directory_is_one_line(tmp_path, synthetic, capsys):
    make_config(synthetic, tmp_path / "out")
    assert evaluate.main(["--config", str(tmp_path / "out.yaml"), "--checkpoint", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"error: --checkpoint {tmp_path / 'nope'}: no such directory" in err and "Traceback" not in err


@pytest.mark.parametrize("harm, says", [
    ("cut", r"hf/model\.safetensors is truncated: 1000 bytes"),
    ("config", r"hf/config\.json: model config cannot be read as JSON"),
    ("edited", r"hf/generation_config\.json is longer than saved: \d+ bytes, \d+ when saved"),
])
def test_a_broken_export_is_one_line_before_any_checkpoint_is_evaluated(tmp_path, synthetic, tiny, capsys, harm,
                                                                          says):
    """A run whose second export is damaged: named up front (not after evaluating the first)."""
    import shutil

    from grpo import manifest

    make_config(synthetic, tmp_path / "out")
    run = tmp_path / "run"
    for step in (1, 2):
        step_dir = run / "checkpoints" / f"step_{step}"
        shutil.copytree(tiny, step_dir / "hf")
        manifest.write(step_dir, manifest.record(step_dir))
    hf = run / "checkpoints" / "step_2" / "hf"
    if harm == "cut":
        (hf / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes()[:1000])
    elif harm == "config":
        (hf / "config.json").write_text("{")
    else:  # still valid JSON, but not what the run saved
        (hf / "generation_config.json").write_text((hf / "generation_config.json").read_text() + " ")
    assert evaluate.main(["--config", str(tmp_path / "out.yaml"), "--checkpoint", str(run)]) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.search(says, line), line
    assert "Traceback" not in err and not (tmp_path / "out" / "run-step_1").exists()


def test_a_qwen2_5_omni_thinker_is_evaluated_with_the_mmau_scorer(tmp_path, mmau_subset, monkeypatch):
    """evaluate.py on the tiny Qwen2.5-Omni thinker: the family comes from its config.json, the
    prompts carry its system prompt, and MMAU's scorer gives per-task scores of every question."""
    from models.omni import SYSTEM_PROMPT

    omni_ckpt = build_tiny_checkpoint(tmp_path / "omni", family="qwen2_5_omni", seed=0, corpus=synthetic_corpus())
    path, subset = mmau_subset
    prompts = []
    real_generate = rollout.generate

    def spy(model, embeds, mask, **kwargs):
        prompts.append(type(model).__name__)
        return real_generate(model, embeds, mask, **kwargs)

    monkeypatch.setattr(rollout, "generate", spy)
    seen = []
    real_collate = rollout.collate_prompts
    monkeypatch.setattr(rollout, "collate_prompts", lambda samples, waves, processor, **kw: (
        seen.append(processor.tokenizer.decode(real_collate(samples, waves, processor, **kw)["input_ids"][0])),
        real_collate(samples, waves, processor, **kw))[1])
    config = make_config(path, tmp_path / "out", fmt="mmau")
    [result] = ev.run_evaluation(config, [omni_ckpt])
    assert prompts and set(prompts) == {"Qwen2_5OmniThinkerForConditionalGeneration"}
    assert seen and all(SYSTEM_PROMPT in text for text in seen)
    scores = read(result.out_dir / "scores.json")
    assert scores["total"]["count"] == len(subset)
    assert set(scores["task"]) == {"sound", "music", "speech"}
    preds = read(result.out_dir / "predictions.json")
    assert all(p["model_output"] == p["model_prediction"] for p in preds)
