"""What happens when things go wrong: bad values, bad samples, crashes, resumes, reused
directories, tampered files. Each test names the behaviour it pins down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from grpo.config import Config, ConfigError, load_config

# --------------------------------------------------------------------------- config values


def _numeric_keys(config) -> list[str]:
    """Every int or float key of a config of dataclass sections (bools are not numbers here)."""
    keys = []
    for section in dataclasses.fields(config):
        hints = typing.get_type_hints(type(getattr(config, section.name)))
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(config, section.name))
                 if hints[f.name] in (int, float)]
    return keys


@pytest.mark.parametrize("key", _numeric_keys(Config()))
def test_every_numeric_training_key_rejects_a_negative_value_by_name(key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=-1"])
    msg = str(err.value)
    assert f"'{key}'" in msg and "-1" in msg and ("allowed" in msg or "choose one of" in msg), msg


def test_every_numeric_evaluation_key_rejects_a_negative_value_by_name():
    from evaluation.config import EvalConfig, load_eval_config

    keys = _numeric_keys(EvalConfig())
    assert "generation.max_new_tokens" in keys
    for key in keys:
        with pytest.raises(ConfigError) as err:
            load_eval_config(None, ["data.path=x.json", f"{key}=-1"])
        msg = str(err.value)
        assert f"'{key}'" in msg and "-1" in msg and ("allowed" in msg or "choose one of" in msg), msg


@pytest.mark.parametrize("override, allowed", [
    ("rollout.group_size=1", "group_size >= 2"),
    ("rollout.temperature=0", "temperature > 0"),
    ("algorithm.beta=-0.01", "beta >= 0"),
    ("algorithm.advantage_eps=0", "advantage_eps > 0"),
    ("checkpointing.keep_last=0", "keep_last >= 1"),
    ("checkpointing.keep_exports=-1", "keep_exports >= 0"),
    ("rollout.max_new_tokens=0", "max_new_tokens >= 1"),
    ("rollout.top_k=-5", "top_k >= 0"),
    ("rollout.top_p=0", "top_p in (0, 1]"),
    ("rollout.top_p=1.01", "top_p in (0, 1]"),
    ("rollout.generation_batch_prompts=0", "generation_batch_prompts >= 1"),
    ("algorithm.micro_batch_prompts=0", "micro_batch_prompts >= 1"),
    ("logging.log_every=-1", "log_every >= 1"),
    ("data.eval_every=-1", "eval_every >= 0"),
    ("rollout.temperature=.nan", "temperature > 0"),
    ("distribution.timeout_minutes=0", "timeout_minutes > 0"),
])
def test_out_of_range_values_name_key_value_and_range(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and allowed in msg and "command-line overrides" in msg, msg


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9, 0.999, 0.1]", "[0.9, 1.0]", "[-0.1, 0.9]"])
def test_optimizer_betas_must_be_two_numbers_in_zero_one(betas):
    with pytest.raises(ConfigError, match=r"'optimizer.betas'.*two numbers, each in \[0, 1\)"):
        load_config(None, [f"optimizer.betas={betas}"])


def test_empty_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'run.output_dir'.*empty"):
        load_config(None, ["run.output_dir=''"])
    with pytest.raises(ConfigError, match="'model.path'.*empty"):
        load_config(None, ["data.train_path=x.jsonl"], require_paths=True)
    with pytest.raises(ConfigError, match="'data.train_path'.*empty"):
        load_config(None, ["model.path=m"], require_paths=True)
    assert load_config(None, ["model.path=m", "data.train_path=x.jsonl"], require_paths=True).model.path == "m"


# --------------------------------------------------------------------------- data files and clips


def _avqa(i, **kw):
    rec = {"id": i, "question_text": "Which?", "multi_choice": ["dog", "cat"], "answer": 0,
           "audio_path": f"{i}.wav"}
    rec.update(kw)
    return rec


def _jsonl(path, records, prefix=""):
    import json

    path.write_text(prefix + "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    from data.datasets import read_avqa, read_mmau

    samples = read_avqa(_jsonl(tmp_path / "bom.jsonl", [_avqa(1), _avqa(2)], prefix="\ufeff"))
    assert [s.id for s in samples] == ["1", "2"]
    mmau = tmp_path / "bom.json"
    mmau.write_text('\ufeff[{"id": "a", "audio_id": "a.wav", "question": "?", "choices": ["x", "y"], '
                    '"answer": "x"}]', encoding="utf-8")
    assert [s.id for s in read_mmau(mmau)] == ["a"]


def test_duplicate_ids_are_an_error_naming_both_lines(tmp_path):
    from data.datasets import DataError, read_avqa

    path = _jsonl(tmp_path / "dup.jsonl", [_avqa(1), _avqa(2), _avqa(1)])
    with pytest.raises(DataError, match=r"dup.jsonl: line 3: duplicate id '1' \(first at line 1\)"):
        read_avqa(path)
    assert [s.id for s in read_avqa(path, on_error="skip")] == ["1", "2"]  # skipped and counted


def test_duplicate_choices_in_a_training_question_are_an_error(tmp_path):
    from data.datasets import DataError, read_dataset

    path = _jsonl(tmp_path / "train.jsonl", [_avqa(1), _avqa(2, multi_choice=["dog", "cat", "dog"])])
    with pytest.raises(DataError, match=r"train.jsonl: line 2: .*same choice twice \('dog'\)"):
        read_dataset("avqa", path, unique_choices=True)
    # benchmarks do repeat choices (MMAU test-mini has 40 such questions): read as they are
    assert len(read_dataset("avqa", path)) == 2


def test_trainer_reads_training_questions_with_unique_choices(monkeypatch, tmp_path):
    """The trainer asks for distinct choices (the reader test above shows what that does)."""
    import grpo.setup as setup_module
    import grpo.trainer as trainer_module

    seen = {}

    def reader(fmt, path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(setup_module, "read_dataset", reader)  # the trainer reads through grpo.setup
    cfg = load_config(None, ["model.path=m", "data.train_path=t.jsonl", f"run.output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer_module.Trainer(cfg, _single_process())
    assert seen["unique_choices"] is True


def _single_process():
    import torch

    from models.distributed import DistInfo

    return DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _write_wav(path, samples, rate=16000):
    import numpy as np
    import soundfile as sf

    sf.write(path, np.asarray(samples, dtype=np.float32), rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_audio_is_refused_naming_the_file(tmp_path, bad):
    import numpy as np

    from data.audio import AudioError, load_audio

    wave = np.full(1600, 0.1, dtype=np.float32)
    wave[100] = bad
    path = _write_wav(tmp_path / "broken.wav", wave)
    with pytest.raises(AudioError, match=r"broken.wav: 1 of 1600 audio samples are NaN or Inf"):
        load_audio(path)


def test_nan_audio_is_skipped_and_counted_by_the_stream(tmp_path):
    import numpy as np

    from data.audio import AudioError, AudioLoader
    from data.datasets import Sample
    from grpo.stream import PromptStream

    good = _write_wav(tmp_path / "good.wav", np.full(1600, 0.1))
    bad = _write_wav(tmp_path / "bad.wav", np.full(1600, np.nan))
    samples = [Sample(id=str(i), audio_path=str(p), question="?", choices=["a", "b"], answer="a", task=None)
               for i, p in enumerate([good, bad, good])]
    stream = PromptStream(samples, AudioLoader(), seed=0, shuffle=False, on_error="skip")
    taken, _ = stream.take(2)
    assert [s.id for s in taken] == ["0", "2"] and stream.skipped["audio"] == 1
    with pytest.raises(AudioError, match="bad.wav"):
        PromptStream(samples, AudioLoader(), seed=0, shuffle=False).take(2)


# --------------------------------------------------------------------------- checkpoint files


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np
    import torch

    from grpo.checkpoint import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "rank0.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rank0.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_rank_file_with_a_pickled_callable_is_refused(tmp_path):
    import torch

    from grpo.checkpoint import COMPLETE, ResumeError, load_training_state

    ckpt = tmp_path / "checkpoints" / "step_3"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / COMPLETE).write_text('{"step": 3}')
    marker = tmp_path / "code-ran"
    torch.save({"rng": _RunsCode(marker), "stream": {}}, ckpt / "rank0.pt")
    with pytest.raises(ResumeError, match=r"rank0.pt: refused to load: it holds Python objects"):
        # refused before the model is touched (verify=False: the rank file is what is tested)
        load_training_state(ckpt, model=None, optimizer=None, rank=0, verify=False)
    assert not marker.exists(), "the pickled call ran"


# --------------------------------------------------------------------------- training runs (in process)


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A tiny model and a few synthetic questions (train and held-out)."""
    from data.synthetic import generate_synthetic, synthetic_corpus
    from models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("reliability")
    model = build_tiny_checkpoint(root / "model", seed=0, corpus=synthetic_corpus())
    train = generate_synthetic(root / "data", n=8, seed=0, tasks=["pitch"], split="train", progress=False)
    held_out = generate_synthetic(root / "data", n=4, seed=1, tasks=["pitch"], split="eval", progress=False)
    return {"root": root, "model": model, "train": train, "eval": held_out}


def quick_overrides(world, out, *extra) -> list[str]:
    """Seconds-long GRPO runs: no warm-up, no reference model, 2 prompts x G = 2, 4 new tokens."""
    return [f"run.output_dir={out}", "run.steps=2", f"model.path={world['model']}", "model.build_tiny=false",
            f"data.train_path={world['train']}", f"data.eval_path={world['eval']}", "data.synthetic_generate=false",
            "data.eval_every=0", "data.eval_samples=0", "rollout.prompts_per_step=2", "rollout.group_size=2",
            "rollout.generation_batch_prompts=2", "rollout.max_new_tokens=4", "algorithm.beta=0",
            "algorithm.dynamic_sampling=false", "algorithm.format_warmup_steps=0", "algorithm.micro_batch_prompts=2", "checkpointing.every=0",
            "checkpointing.export=false", "checkpointing.save_on_signal=false", "logging.tensorboard=false",
            "logging.progress_bar=false", "logging.sample_every=0", *extra]


def make_trainer(world, out, *extra, **kwargs):
    from grpo.trainer import Trainer

    return Trainer(load_config(TINY, quick_overrides(world, out, *extra)), _single_process(), **kwargs)


def eval_set_with(world, tmp_path, *, broken: str) -> Path:
    """The held-out set with its second clip replaced: 'missing' (deleted) or 'nan' (NaN samples)."""
    import numpy as np

    rows = [json.loads(line) for line in Path(world["eval"]).read_text().splitlines()]
    for r in rows:  # the new file lives elsewhere: absolute clip paths
        r["audio_path"] = str(Path(world["eval"]).parent / r["audio_path"])
    clip = tmp_path / "broken.wav"
    if broken == "nan":
        _write_wav(clip, np.full(1600, np.nan))
    rows[1]["audio_path"] = str(clip)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("broken", ["missing", "nan"])
def test_an_unreadable_held_out_clip_is_skipped_counted_and_logged(small_world, tmp_path, caplog, broken):
    eval_path = eval_set_with(small_world, tmp_path, broken=broken)
    trainer = make_trainer(small_world, tmp_path / "run", f"data.eval_path={eval_path}", "data.on_error=skip")
    with caplog.at_level("WARNING"):
        final = trainer.train()
    assert final["eval/skipped_samples"] == 1.0
    assert 0.0 <= final["eval/greedy_accuracy"] <= 1.0 and len(trainer.eval_samples) == 3
    assert any("1 of 4 held-out questions skipped" in r.message and "broken.wav" in r.message
               for r in caplog.records)
    trainer.close()


def test_an_unreadable_held_out_clip_stops_the_run_before_step_1_naming_the_file(small_world, tmp_path):
    from data.audio import AudioError

    eval_path = eval_set_with(small_world, tmp_path, broken="missing")
    with pytest.raises(AudioError, match="broken.wav: audio file not found"):
        make_trainer(small_world, tmp_path / "run", f"data.eval_path={eval_path}")


def _complete_checkpoints(run_dir: Path) -> list[int]:
    from grpo.checkpoint import list_checkpoints

    return [step for step, _ in list_checkpoints(run_dir)]


def test_a_failing_final_evaluation_leaves_the_final_checkpoint(small_world, tmp_path):
    trainer = make_trainer(small_world, tmp_path / "run")

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("the evaluation broke")

    trainer.greedy_accuracy = broken_evaluation
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        trainer.train()
    assert _complete_checkpoints(tmp_path / "run") == [2]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()] \
        == [1, 2]  # the last step's line is written too, without the evaluation


def test_a_failure_inside_a_step_saves_the_last_completed_step(small_world, tmp_path):
    """Step 3 takes questions from the stream, then fails before updating the weights: the
    checkpoint is step 2's state exactly (data position included), not a half-done step 3."""
    import torch

    from data.audio import AudioError

    trainer = make_trainer(small_world, tmp_path / "run", "run.steps=4")
    real_step, after_step_2 = trainer.train_step, {}

    def failing_step():
        if trainer.step == 2:
            after_step_2.update(stream=trainer.stream.state_dict(), weights=[p.detach().clone() for p in
                                                                              trainer.model.parameters()])
            trainer.stream.take(2)
            raise AudioError("clip.wav", "disappeared")
        return real_step()

    trainer.train_step = failing_step
    with pytest.raises(AudioError, match="disappeared"):
        trainer.train()
    assert _complete_checkpoints(tmp_path / "run") == [2]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_2" / "rank0.pt", weights_only=True)
    assert saved["stream"] == after_step_2["stream"]
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.json").read_text())["step"] == 2

    trainer.close()
    resumed = make_trainer(small_world, tmp_path / "run", "run.steps=4", resume="latest")
    assert resumed.step == 2 and resumed.stream.state_dict() == after_step_2["stream"]
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), after_step_2["weights"]))
    resumed.close()


def test_a_failure_after_the_weights_changed_saves_nothing_half_done(small_world, tmp_path, monkeypatch):
    import grpo.step

    trainer = make_trainer(small_world, tmp_path / "run", "run.steps=4", "checkpointing.every=1")
    real_update = grpo.step.policy_update

    def update_then_fail(ctx, counters, traj):
        seen = real_update(ctx, counters, traj)
        if trainer.step == 2:
            raise RuntimeError("failed after the optimizer step")
        return seen

    monkeypatch.setattr(grpo.step, "policy_update", update_then_fail)
    with pytest.raises(RuntimeError, match="after the optimizer step"):
        trainer.train()
    assert _complete_checkpoints(tmp_path / "run") == [1, 2]  # every=1: steps 1 and 2, and no 'step 3'


# --------------------------------------------------------------------------- the run directory


def test_a_fresh_run_into_a_non_empty_directory_is_refused(tmp_path):
    from grpo.rundir import RunDirError, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match=r"already holds a run \(history.jsonl\).*--resume.*run.overwrite=true"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "history.jsonl").read_text() == "{}\n" and not (run / "run.lock").exists()
    prepare_run_dir(run, resume=True, overwrite=False).release()  # --resume continues it
    prepare_run_dir(tmp_path / "new", resume=False, overwrite=False).release()  # absent or empty: fine


def test_a_directory_where_no_step_completed_holds_no_run(tmp_path):
    from grpo.rundir import RunDirError, prepare_run_dir

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events.out.tfevents.1.host.1.0").write_bytes(b"header only")
    (run / "config.yaml").write_text("run: {}\n")
    (run / "history.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    lock = prepare_run_dir(run, resume=False, overwrite=False)  # what a failed start leaves: cleared, used
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]
    lock.release()
    (run / "config.yaml").write_text("run: {}\n")
    (run / "notes.txt").write_text("mine")  # not the trainer's: the directory is not ours to clear
    with pytest.raises(RunDirError, match=r"is not a run directory: it holds files no run writes \(notes.txt\)"):
        prepare_run_dir(run, resume=False, overwrite=False)
    assert (run / "notes.txt").read_text() == "mine"
    (run / "notes.txt").unlink()
    (run / "history.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(config.yaml, history.jsonl\)\. It has no checkpoint"):
        prepare_run_dir(run, resume=False, overwrite=False)


def test_resume_without_a_checkpoint_is_an_error_and_auto_starts_fresh(small_world, tmp_path):
    from grpo.checkpoint import ResumeError

    with pytest.raises(ResumeError, match=r"holds no checkpoint to continue from.*--resume auto"):
        make_trainer(small_world, tmp_path / "run", resume="latest")
    assert not (tmp_path / "run").exists()
    trainer = make_trainer(small_world, tmp_path / "run", resume="auto")
    assert trainer.resume_path is None and trainer.step == 0
    trainer.train()
    trainer.close()
    trainer = make_trainer(small_world, tmp_path / "run", "run.steps=3", resume="auto", allow_config_change=True)
    assert trainer.step == 2  # a checkpoint now exists: auto continues it
    trainer.close()


def test_a_start_that_failed_leaves_nothing_that_blocks_the_corrected_command(small_world, tmp_path):
    from data.audio import AudioError

    broken = eval_set_with(small_world, tmp_path, broken="missing")  # fails after the run directory is set up
    with pytest.raises(AudioError, match="broken.wav"):
        make_trainer(small_world, tmp_path / "run", f"data.eval_path={broken}", "logging.tensorboard=true")
    assert (tmp_path / "run" / "config.yaml").is_file()  # the failed start's config
    trainer = make_trainer(small_world, tmp_path / "run", "logging.tensorboard=true")  # the corrected command
    trainer.train()
    trainer.close()
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 2


def test_overwrite_moves_the_old_run_aside_first(tmp_path):
    from grpo.rundir import prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "history.jsonl").write_text("old\n")
    lock = prepare_run_dir(run, resume=False, overwrite=True)
    [aside] = list(tmp_path.glob("run.replaced-*"))
    assert (aside / "history.jsonl").read_text() == "old\n" and (aside / "checkpoints").is_dir()
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"] and lock.held
    assert not (aside / "run.lock").exists()
    lock.release()
    assert not (run / "run.lock").exists()


_HOLD_LOCK = """
import sys, time
from grpo.rundir import acquire_lock
lock = acquire_lock(sys.argv[1])  # held while the object lives
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def _lock_held_elsewhere(run):
    """Another process holds ``run``'s lock while the block runs; it is then killed (SIGKILL),
    so it dies without removing its lock file, as a crashed run would."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_reported_and_taken_over(tmp_path, caplog):
    from grpo.rundir import RunDirError, acquire_lock

    run = tmp_path / "run"
    with _lock_held_elsewhere(run) as holder:  # killed at the end: dies without removing its lock file
        with pytest.raises(RunDirError, match=rf"in use by another run: pid {holder.pid} on .*run.lock"):
            acquire_lock(run)
    assert (run / "run.lock").is_file()
    with caplog.at_level("WARNING"):
        lock = acquire_lock(run)
    assert any(f"stale lock from pid {holder.pid}" in r.message and "taking it over" in r.message
               for r in caplog.records)
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_directory_in_use_is_said_first_and_never_with_a_hint_to_overwrite_it(tmp_path):
    from grpo.rundir import RunDirError, check_run_dir, prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {}\n")
    (run / "history.jsonl").write_text('{"step": 1}\n')  # a live run that completed a step
    with _lock_held_elsewhere(run) as holder:
        for resume, overwrite in ((False, False), (False, True), (True, False)):
            for check in (check_run_dir, prepare_run_dir):
                with pytest.raises(RunDirError, match=rf"in use by another run: pid {holder.pid} ") as err:
                    check(run, resume=resume, overwrite=overwrite)
                assert "overwrite" not in str(err.value) and "already holds" not in str(err.value)
    assert (run / "history.jsonl").read_text() == '{"step": 1}\n' and not list(tmp_path.glob("run.replaced-*"))


# --------------------------------------------------------------------------- resuming with another config


def _run_with_checkpoint(tmp_path, cfg, step=3) -> Path:
    """A run directory as the trainer leaves it: config.yaml and one complete checkpoint."""
    from grpo.config import save_config

    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    ckpt = run / "checkpoints" / f"step_{step}"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    return ckpt


BASE = ["model.path=m", "data.train_path=t.jsonl"]


def test_resume_with_changed_optimisation_keys_lists_each_key_and_both_values(tmp_path):
    from grpo.rundir import record_config

    ckpt = _run_with_checkpoint(tmp_path, load_config(None, BASE + ["optimizer.lr=1e-3"]))
    original = (tmp_path / "run" / "config.yaml").read_text()
    changed = load_config(None, BASE + ["optimizer.lr=2e-3", "rollout.group_size=4", "run.seed=5",
                                        "data.train_path=other.jsonl"])
    with pytest.raises(ConfigError) as err:
        record_config(tmp_path / "run", changed, ckpt, allow_change=False)
    msg = str(err.value)
    for key, old, new in [("optimizer.lr", "0.001", "0.002"), ("rollout.group_size", "8", "4"),
                          ("run.seed", "0", "5"), ("data.train_path", "'t.jsonl'", "'other.jsonl'")]:
        assert f"{key}: {old} -> {new}" in msg, msg
    assert "--allow-config-change" in msg
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    assert not list((tmp_path / "run").glob("config.resume-*"))


def test_resume_with_free_keys_changed_needs_no_flag_and_keeps_config_yaml(tmp_path):
    from grpo.rundir import record_config

    ckpt = _run_with_checkpoint(tmp_path, load_config(None, BASE))
    original = (tmp_path / "run" / "config.yaml").read_text()
    written = record_config(tmp_path / "run", load_config(None, BASE + ["logging.log_every=5",
                                                                        "checkpointing.every=7"]), ckpt,
                            allow_change=False)
    assert written == tmp_path / "run" / "config.resume-step3.yaml"
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    assert load_config(written).logging.log_every == 5


def test_allow_config_change_logs_the_change_and_keeps_it_next_to_the_original(tmp_path, caplog):
    from grpo.rundir import record_config

    ckpt = _run_with_checkpoint(tmp_path, load_config(None, BASE))
    original = (tmp_path / "run" / "config.yaml").read_text()
    with caplog.at_level("WARNING"):
        written = record_config(tmp_path / "run", load_config(None, BASE + ["optimizer.lr=5e-6"]), ckpt,
                                allow_change=True)
    assert any("optimizer.lr changed: 1e-06 -> 5e-06" in r.message for r in caplog.records)
    assert load_config(written).optimizer.lr == 5e-6
    assert (tmp_path / "run" / "config.yaml").read_text() == original


def test_the_trainer_refuses_a_changed_resume_unless_allowed(small_world, tmp_path):
    first = make_trainer(small_world, tmp_path / "run", "checkpointing.every=1")
    first.train()
    first.close()
    with pytest.raises(ConfigError, match=r"optimizer.lr: 0.001 -> 0.002"):
        make_trainer(small_world, tmp_path / "run", "run.steps=3", "optimizer.lr=2e-3", resume="latest")
    resumed = make_trainer(small_world, tmp_path / "run", "run.steps=3", "optimizer.lr=2e-3", resume="latest",
                           allow_config_change=True)
    assert resumed.step == 2
    assert load_config(tmp_path / "run" / "config.yaml").optimizer.lr == 1e-3  # the original, kept
    assert load_config(tmp_path / "run" / "config.resume-step2.yaml").optimizer.lr == 2e-3
    resumed.close()


def test_a_second_trainer_in_the_same_directory_is_refused(small_world, tmp_path):
    from grpo.rundir import RunDirError

    first = make_trainer(small_world, tmp_path / "run")  # no step yet: only the lock keeps a second one out
    with pytest.raises(RunDirError, match="in use by another run"):
        make_trainer(small_world, tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").is_file()  # the first run's, untouched
    first.close()


# --------------------------------------------------------------------------- over-long prompts


def test_prompt_length_is_what_the_processor_builds(tiny_processor):
    import numpy as np

    from data.collate import collate_prompts, prompt_length
    from data.datasets import Sample

    sample = Sample(id="1", audio_path="x.wav", question="Is the tone high or low?", choices=["high", "low"],
                    answer="high", task=None)
    window = tiny_processor.feature_extractor.n_samples
    for n in [1, 159, 160, 161, 800, 16000, window - 1, window, window + 1, 2 * window]:
        batch = collate_prompts([sample], [np.zeros(n, dtype=np.float32)], tiny_processor, template=2)
        assert prompt_length(sample, n, tiny_processor, template=2) == batch["input_ids"].shape[1], n


@pytest.fixture(scope="module")
def mixed_lengths(small_world):
    """Training questions with 0.5 s and 3 s clips, and the prompt lengths they make."""
    import numpy as np

    from data.collate import prompt_length
    from data.datasets import read_avqa
    from models.loading import load_processor

    root = small_world["root"] / "mixed"
    root.mkdir()
    rows = []
    for i, seconds in enumerate([0.5, 3.0, 0.5, 3.0]):
        _write_wav(root / f"{i}.wav", np.full(int(16000 * seconds), 0.1))
        rows.append(_avqa(f"{'long' if seconds > 1 else 'short'}-{i}", audio_path=f"{i}.wav"))
    path = _jsonl(root / "train.jsonl", rows)
    processor = load_processor(small_world["model"])
    lengths = {s.id: prompt_length(s, int(16000 * (3.0 if s.id.startswith("long") else 0.5)), processor,
                                   template=2) for s in read_avqa(path)}
    return path, lengths


def test_an_over_long_prompt_is_an_error_naming_the_sample_or_a_counted_skip(small_world, tmp_path, mixed_lengths):
    from data.datasets import DataError

    path, lengths = mixed_lengths
    limit = (lengths["short-0"] + lengths["long-1"]) // 2
    args = (f"data.train_path={path}", "data.eval_path=null", "data.shuffle=false", f"data.max_prompt_tokens={limit}")
    trainer = make_trainer(small_world, tmp_path / "raise", *args)
    with pytest.raises(DataError, match=rf"sample long-1 \(.*1.wav\): its prompt is {lengths['long-1']} tokens "
                                        rf".*over {limit} = data.max_prompt_tokens={limit}"):
        trainer.stream.take(2)
    trainer.close()
    trainer = make_trainer(small_world, tmp_path / "skip", *args, "data.on_error=skip")
    samples, _ = trainer.stream.take(2)
    assert [s.id for s in samples] == ["short-0", "short-2"] and trainer.stream.skipped["filtered"] == 1
    trainer.close()


def test_prompts_are_checked_against_the_model_context(small_world, tmp_path, mixed_lengths):
    from data.datasets import DataError

    path, lengths = mixed_lengths
    context = 4096  # the tiny model's max_position_embeddings
    new_tokens = context - (lengths["short-0"] + lengths["long-1"]) // 2
    trainer = make_trainer(small_world, tmp_path / "ctx", f"data.train_path={path}", "data.eval_path=null",
                           "data.shuffle=false", f"rollout.max_new_tokens={new_tokens}")
    with pytest.raises(DataError, match=rf"sample long-1 .*the model's context \(4096\) minus "
                                        rf"rollout.max_new_tokens \({new_tokens}\)"):
        trainer.stream.take(2)
    trainer.close()
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=4096 leaves no room .*context of 4096"):
        make_trainer(small_world, tmp_path / "full", f"data.train_path={path}", "rollout.max_new_tokens=4096")


def test_an_over_long_held_out_prompt_stops_the_run_before_step_1(small_world, tmp_path, mixed_lengths):
    from data.datasets import DataError

    path, lengths = mixed_lengths
    limit = (lengths["short-0"] + lengths["long-1"]) // 2
    with pytest.raises(DataError, match="sample long-1"):
        make_trainer(small_world, tmp_path / "run", f"data.eval_path={path}", f"data.max_prompt_tokens={limit}",
                     f"data.train_path={path}")


# --------------------------------------------------------------------------- train.py as a user runs it


def _run_train(args, **kwargs):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(TINY), *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_saves_the_step_then_exits_143(small_world, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = _run_train(quick_overrides(small_world, out, "run.steps=500", "checkpointing.save_on_signal=true"))
    history = out / "history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (history.is_file() and history.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = len(history.read_text().splitlines())
    assert stopped_at < 500 and _complete_checkpoints(out) == [stopped_at]
    assert "stopped by signal 15" in err


def test_user_errors_print_one_line_and_debug_shows_the_traceback(small_world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text("{}\n")  # an old run is there
    _, err = (proc := _run_train(quick_overrides(small_world, out))).communicate(timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"error: {out} already holds a run" in line and "--debug" in line
    _, err = (proc := _run_train([*quick_overrides(small_world, out), "--debug"])).communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" in err and "RunDirError" in err


def test_the_collective_timeout_comes_from_the_config(monkeypatch, tmp_path):
    import models.distributed
    import train

    seen = {}

    def init_distributed(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(models.distributed, "init_distributed", init_distributed)
    with pytest.raises(RuntimeError, match="stop before training"):
        train.main(["--config", str(TINY), "distribution.timeout_minutes=2.5", f"run.output_dir={tmp_path}"])
    assert seen["timeout_s"] == 150.0


def test_a_run_that_fails_to_start_leaves_its_directory_unlocked(small_world, tmp_path):
    first = make_trainer(small_world, tmp_path / "run", "checkpointing.every=1")
    first.train()
    first.close()
    failed = None
    try:
        make_trainer(small_world, tmp_path / "run", "optimizer.lr=2e-3", resume="latest")
    except ConfigError as err:
        failed = err  # keeps the half-built trainer alive through the traceback
    assert failed is not None and not (tmp_path / "run" / "run.lock").exists()
    make_trainer(small_world, tmp_path / "run", resume="latest").close()


# --------------------------------------------------------------------------- crafted, damaged, unwritable checkpoints


KEEP_TWO = ("checkpointing.every=1", "checkpointing.keep_last=2")


@pytest.fixture(scope="module")
def two_checkpoints(small_world, tmp_path_factory):
    """A run directory with complete checkpoints at steps 1 and 2 (copied by each test)."""
    out = tmp_path_factory.mktemp("two-checkpoints") / "run"
    trainer = make_trainer(small_world, out, *KEEP_TWO)
    trainer.train()
    trainer.close()
    assert _complete_checkpoints(out) == [1, 2]
    return out


def _copy_run(two_checkpoints, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(two_checkpoints, tmp_path / "run"))


def test_resume_never_runs_code_from_a_crafted_dcp_metadata_file(small_world, two_checkpoints, tmp_path):
    """torch reads state/.metadata with pickle.load: a file whose unpickling calls os.system,
    with the manifest rewritten to match it, is refused and the call never runs."""
    import pickle

    from grpo import manifest
    from grpo.checkpoint import ResumeError

    run = _copy_run(two_checkpoints, tmp_path)
    ckpt = run / "checkpoints" / "step_2"
    marker = tmp_path / "code-ran"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    manifest.write(ckpt, manifest.record(ckpt))
    with pytest.raises(ResumeError, match=r"step_2/state/\.metadata: refused to load: not DCP checkpoint metadata"):
        make_trainer(small_world, run, *KEEP_TWO, resume="latest")
    assert not marker.exists(), "the pickled call ran"


def test_resume_from_a_truncated_shard_names_it_and_the_newest_checkpoint_that_verifies(
        small_world, two_checkpoints, tmp_path, monkeypatch):
    import grpo.trainer
    from grpo.checkpoint import ResumeError

    run = _copy_run(two_checkpoints, tmp_path)
    shard = run / "checkpoints" / "step_2" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    loaded = []
    monkeypatch.setattr(grpo.trainer, "prepare_model", lambda cfg: loaded.append(cfg))
    with pytest.raises(ResumeError) as err:
        make_trainer(small_world, run, *KEEP_TWO, resume="latest")
    message = str(err.value)
    assert message.startswith(f"{shard} is truncated: 1000 bytes, ") and "\n" not in message
    assert message.endswith(f"the newest checkpoint that verifies is {run / 'checkpoints' / 'step_1'}: "
                            f"resume from it with --resume {run / 'checkpoints' / 'step_1'}")
    assert loaded == []  # refused before the model was even prepared
    resumed = make_trainer(small_world, run, *KEEP_TWO, resume=str(run / "checkpoints" / "step_1"))
    assert resumed.step == 1
    resumed.close()


def _failing_shard_writes(monkeypatch, step: int):
    """Writing step ``step``'s DCP shard fails as a full disk would (in process: no root needed)."""
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    original = fs._write_item

    def write_item(transforms, stream, *args, **kwargs):
        if f".tmp_step_{step}" in str(getattr(stream, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device", stream.name)
        return original(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", write_item)


def test_a_full_disk_while_saving_is_one_line_and_a_non_zero_exit(small_world, tmp_path, monkeypatch, capsys):
    import train
    from grpo.checkpoint import checkpoint_problem

    out = tmp_path / "run"
    _failing_shard_writes(monkeypatch, step=2)
    rc = train.main(["--config", str(TINY), *quick_overrides(small_world, out, *KEEP_TWO)])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"could not save the checkpoint of step 2 to {out / 'checkpoints' / 'step_2'}: no space left on device" \
        in line and "[errno ENOSPC]" in line
    assert f"the newest complete checkpoint is {out / 'checkpoints' / 'step_1'} (step 1)" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]  # no .tmp_step_2 left
    assert checkpoint_problem(out / "checkpoints" / "step_1") is None


@pytest.mark.slow
def test_a_write_the_os_refuses_while_saving_is_one_line_from_train_py(small_world, two_checkpoints, tmp_path):
    """A real write error from the kernel, without root: RLIMIT_FSIZE caps the size of any file
    the process writes (EFBIG), so the DCP shard of step 2 cannot be written."""
    import resource
    import shutil
    import signal

    from grpo.checkpoint import checkpoint_problem

    run = _copy_run(two_checkpoints, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_2")
    shard_bytes = (run / "checkpoints" / "step_1" / "state" / "__0_0.distcp").stat().st_size
    step_1 = {p: p.read_bytes() for p in (run / "checkpoints" / "step_1").rglob("*") if p.is_file()}

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (shard_bytes // 2, shard_bytes // 2))

    proc = _run_train([*quick_overrides(small_world, run, *KEEP_TWO), "--resume"],
                      preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"could not save the checkpoint of step 2 to {run / 'checkpoints' / 'step_2'}" in line, line
    assert "[errno EFBIG]" in line and f"newest complete checkpoint is {run / 'checkpoints' / 'step_1'}" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]
    assert {p: p.read_bytes() for p in (run / "checkpoints" / "step_1").rglob("*") if p.is_file()} == step_1
    assert checkpoint_problem(run / "checkpoints" / "step_1") is None


def test_a_missing_data_file_writes_nothing_and_the_corrected_command_runs(small_world, tmp_path):
    out = tmp_path / "run"
    _, err = (proc := _run_train([*quick_overrides(small_world, out), "data.train_path=nowhere.jsonl"])
              ).communicate(timeout=300)
    assert proc.returncode == 1 and not out.exists()
    assert err.strip().splitlines() == ["error: data.train_path nowhere.jsonl: file not found (--debug shows the "
                                        "traceback)"]
    _, err = (proc := _run_train(quick_overrides(small_world, out))).communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _scalar_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_each_steps_curves_and_history_line_are_on_disk_when_the_step_is_logged(small_world, tmp_path,
                                                                                monkeypatch):
    """Whatever ends a run later (a kill, an abort at exit), what was logged is on disk: checked
    right after each step's logging, with TensorBoard's background writer slowed down."""
    import time

    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.02), write(self, data))[1])
    trainer = make_trainer(small_world, tmp_path / "run", "run.steps=3", "logging.tensorboard=true")
    seen = []  # per step: (steps with curves on disk, history lines on disk)
    log_step, write_history = trainer.log.metrics, trainer.log.history

    def logged(*args):
        log_step(*args)
        seen.append(_scalar_steps(tmp_path / "run" / "tb", "train/phase"))  # the step's last scalar

    def written(*args):
        write_history(*args)
        seen[-1] = (seen[-1], len((tmp_path / "run" / "history.jsonl").read_text().splitlines()))

    monkeypatch.setattr(trainer.log, "metrics", logged)
    monkeypatch.setattr(trainer.log, "history", written)
    trainer.train()
    trainer.close()
    assert seen == [([1], 1), ([1, 2], 2), ([1, 2, 3], 3)]


def test_the_progress_output_shows_each_phase_and_no_library_noise(small_world, tmp_path):
    overrides = [o for o in quick_overrides(small_world, tmp_path / "run") if not o.startswith(("logging.",
                 "algorithm.format_warmup_steps"))]
    _, err = (proc := _run_train([*overrides, "algorithm.format_warmup_steps=2", "logging.sample_every=1"])
              ).communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "format warm-up: 100%" in err and "GRPO: 100%" in err  # one bar (and ETA) per phase
    assert "deprecated" not in err and "Loading weights" not in err
    samples = [line for line in err.splitlines() if "samples:" in line]
    assert samples and all(line.startswith("20") for line in samples)  # on a line of their own, not after a bar


# --------------------------------------------------------------------------- under torchrun


def _torchrun_train(args: list[str]) -> subprocess.CompletedProcess:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train.py"), "--config", str(TINY), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _ours_and_exit_codes(proc) -> tuple[list[str], list[str]]:
    """(what the ranks printed before torchrun's own report, each rank's exit code in that report)."""
    import re

    lines = proc.stderr.splitlines()
    # torchrun reports a failed child with its log lines (W..., E...) and a ChildFailedError block
    first = next((i for i, line in enumerate(lines) if re.match(r"^[WE]\d{4} ", line)), len(lines))
    ours = [line for line in lines[:first] if "[rank0] INFO" not in line and not line.startswith(" ")]
    return ours, re.findall(r"^\s+exitcode\s*: (-?\d+)", proc.stderr, flags=re.M)


def test_under_torchrun_a_missing_data_file_is_one_line_and_every_rank_exits_1(small_world, tmp_path):
    proc = _torchrun_train([*quick_overrides(small_world, tmp_path / "run"), "data.train_path=nowhere.jsonl"])
    ours, codes = _ours_and_exit_codes(proc)
    assert proc.returncode == 1
    assert ours == ["error: data.train_path nowhere.jsonl: file not found (--debug shows the traceback)"], \
        proc.stderr[-4000:]
    assert codes == ["1", "1"]  # both ranks, the same status (none stopped by torchrun's SIGTERM: -15)
    root_cause = proc.stderr[proc.stderr.index("Root Cause"):]
    assert "traceback : error: data.train_path nowhere.jsonl: file not found" in root_cause  # torchrun's report


@pytest.mark.slow
def test_under_torchrun_rank_0s_run_directory_error_is_one_line_from_one_rank(small_world, tmp_path):
    """The lock is rank 0's to take: its refusal reaches the other rank, which exits alike, silently."""
    run = tmp_path / "run"
    with _lock_held_elsewhere(run) as holder:
        proc = _torchrun_train(quick_overrides(small_world, run))
    ours, codes = _ours_and_exit_codes(proc)
    assert proc.returncode == 1 and "Traceback" not in "\n".join(ours), proc.stderr[-4000:]
    assert len(ours) == 1 and ours[0].startswith(f"error: {run} is in use by another run: pid {holder.pid}")
    assert codes == ["1", "1"]


@pytest.mark.slow
def test_under_torchrun_evaluate_reports_a_missing_checkpoint_once(tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "evaluate.py"), "--config", str(REPO / "configs" / "eval_tiny.yaml"),
                           "--checkpoint", str(tmp_path / "nowhere"), f"output.dir={tmp_path / 'eval'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ours, codes = _ours_and_exit_codes(proc)
    assert proc.returncode == 1
    assert ours == [f"error: --checkpoint {tmp_path / 'nowhere'}: no such directory (--debug shows the traceback)"], \
        proc.stderr[-4000:]
    assert codes == ["1", "1"]
