"""Hostile and careless files and folders: links in a run directory, folders that are not runs,
places that cannot be written, huge values echoed back, YAML aliases, long clips.

Each case is a one-line error or handled as its test says, and nothing outside the run
directory changes: every test that builds an outside folder checks it afterwards
(``_snapshot``: every path in it with its bytes, links not followed).
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from grpo.config import ConfigError, load_config


def _snapshot(root: Path) -> dict:
    """Every entry under ``root`` (links not followed) with its content, or its link target."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top) / name
            rel = str(path.relative_to(root))
            found[rel] = (("link", os.readlink(path)) if path.is_symlink() else
                          ("dir",) if path.is_dir() else ("file", path.read_bytes()))
    return found


def _other_run(tmp_path: Path) -> Path:
    """Another run's directory, as the trainer leaves it: the files a link may point at."""
    other = tmp_path / "other"
    step = other / "checkpoints" / "step_1"
    (step / "state").mkdir(parents=True)
    (step / "state" / "__0_0.distcp").write_bytes(b"weights")
    (step / "rank0.pt").write_bytes(b"rng")
    (step / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (other / "history.jsonl").write_text('{"step": 1}\n')
    (other / "config.yaml").write_text("run: {}\n")
    return other


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# --------------------------------------------------------------------------- links in a run directory


def test_a_fresh_run_removes_a_leftover_link_itself_not_what_it_points_to(tmp_path):
    from grpo.rundir import prepare_run_dir

    outside = tmp_path / "elsewhere"
    outside.mkdir()  # empty: the link is all a failed start left
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside)
    (run / "config.yaml").write_text("run: {}\n")
    before = _snapshot(outside)
    prepare_run_dir(run, resume=False, overwrite=False).release()
    assert not (run / "checkpoints").exists() and not (run / "checkpoints").is_symlink()
    assert outside.is_dir() and _snapshot(outside) == before


def test_a_linked_checkpoints_folder_of_another_run_is_moved_as_a_link_never_followed(tmp_path):
    from grpo.rundir import RunDirError, prepare_run_dir

    other = _other_run(tmp_path)
    before = _snapshot(other)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(other / "checkpoints")
    with pytest.raises(RunDirError, match=r"already holds a run \(checkpoints\)") as err:
        prepare_run_dir(run, resume=False, overwrite=False)
    _one_line(err)
    with pytest.raises(RunDirError, match=r"checkpoints is a symbolic link .*resume into another run.output_dir"):
        prepare_run_dir(run, resume=True, overwrite=False)
    prepare_run_dir(run, resume=False, overwrite=True).release()
    [aside] = tmp_path.glob("run.replaced-*")
    assert (aside / "checkpoints").is_symlink()
    assert _snapshot(other) == before


def test_resume_refuses_a_history_linked_to_another_runs_and_never_appends_to_it(tmp_path):
    from grpo.config import Config
    from grpo.rundir import RunDirError, check_run_dir, prepare_run_dir
    from grpo.runlog import RunLog

    other = _other_run(tmp_path)
    before = _snapshot(other)
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").symlink_to(other / "history.jsonl")
    for check in (lambda: check_run_dir(run, resume=True, overwrite=False),
                  lambda: prepare_run_dir(run, resume=True, overwrite=False)):
        with pytest.raises(RunDirError, match=r"history.jsonl is a symbolic link") as err:
            check()
        _one_line(err)
    cfg = Config()
    cfg.logging.tensorboard = False
    with pytest.raises(OSError, match="symbolic links|Too many levels"):  # a link put there mid-run
        RunLog(run, cfg, is_main=True).history(2, {"train/reward": 1.0})
    assert _snapshot(other) == before


def test_a_linked_lock_file_is_refused_and_its_target_never_truncated(tmp_path):
    from grpo.rundir import RunDirError, acquire_lock, check_run_dir

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").symlink_to(victim)
    for check in (lambda: acquire_lock(run), lambda: check_run_dir(run, resume=False, overwrite=False)):
        with pytest.raises(RunDirError, match=r"run.lock is a symbolic link") as err:
            check()
        _one_line(err)
    assert victim.read_text() == "keep me"


def test_pruning_never_deletes_through_a_linked_checkpoint(tmp_path, caplog):
    from grpo.checkpoint import _prune

    other = _other_run(tmp_path)
    before = _snapshot(other)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_1").symlink_to(other / "checkpoints" / "step_1")
    for n in (2, 3):
        step = run / "checkpoints" / f"step_{n}"
        (step / "state").mkdir(parents=True)
        (step / "rank0.pt").write_bytes(b"rng")
        (step / "trainer_state.json").write_text(json.dumps({"step": n}))
    with caplog.at_level("WARNING"):
        _prune(run, keep_last=1)
    assert _snapshot(other) == before  # the linked step is another run's: left as it is
    assert any("not pruning" in r.getMessage() and "symbolic link" in r.getMessage() for r in caplog.records)
    assert not (run / "checkpoints" / "step_2" / "state").exists()  # its own old state is pruned
    assert (run / "checkpoints" / "step_3" / "state").is_dir()


# --------------------------------------------------------------------------- folders that are not runs


def test_overwrite_never_moves_a_folder_that_holds_no_run(tmp_path):
    from grpo.rundir import RunDirError, check_run_dir, prepare_run_dir

    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "config.yaml").write_text("editor: vim\n")
    before = _snapshot(home)
    for resume, overwrite in ((False, True), (False, False), (True, False)):
        for check in (check_run_dir, prepare_run_dir):
            with pytest.raises(RunDirError, match=r"is not a run directory: it holds files no run writes "
                                                  r"\(notes.txt, photos\)") as err:
                check(home, resume=resume, overwrite=overwrite)
            assert "set run.overwrite" not in _one_line(err)
    assert _snapshot(home) == before and not list(tmp_path.glob("home.replaced-*"))


def test_a_run_with_evaluation_results_inside_is_still_a_run(tmp_path):
    from grpo.rundir import prepare_run_dir

    run = tmp_path / "run"
    (run / "eval" / "step_1").mkdir(parents=True)  # what configs/eval_tiny.yaml writes into runs/tiny
    (run / "config.yaml").write_text("run: {}\n")
    (run / "history.jsonl").write_text('{"step": 1}\n')
    prepare_run_dir(run, resume=False, overwrite=True).release()
    [aside] = tmp_path.glob("run.replaced-*")
    assert (aside / "eval" / "step_1").is_dir()


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    from grpo.rundir import RunDirError, acquire_lock

    (tmp_path / "a_file").write_text("")
    with pytest.raises(RunDirError, match=r"cannot be created: Not a directory \[errno ENOTDIR\]") as err:
        acquire_lock(tmp_path / "a_file" / "run")
    _one_line(err)
    with pytest.raises(RunDirError, match=r"exists and is not a directory"):
        acquire_lock(tmp_path / "a_file")

    def read_only(self, *args, **kwargs):  # what a read-only mount answers (root ignores permission bits)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(RunDirError, match=r"cannot be created: Read-only file system \[errno EROFS\]") as err:
        acquire_lock(tmp_path / "ro" / "run")
    _one_line(err)


def test_a_partial_history_line_left_by_a_kill_does_not_stop_a_resume(tmp_path):
    from grpo.rundir import truncate_history

    (tmp_path / "history.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    truncate_history(tmp_path, 2)
    assert (tmp_path / "history.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


# --------------------------------------------------------------------------- values echoed back


def test_a_huge_value_in_a_training_line_is_quoted_short(tmp_path):
    from data.datasets import DataError, read_avqa

    path = tmp_path / "train.jsonl"
    huge = "x" * 2_000_000
    lines = [{"id": 1, "audio_path": "a.wav", "question_text": "q", "multi_choice": huge, "answer": 0},
             {"id": 2, "audio_path": "a.wav", "question_text": "q", "multi_choice": ["a", huge], "answer": huge},
             {"id": 3, "audio_path": huge, "question_text": "q", "multi_choice": ["a", "b"], "answer": 0},
             {"id": huge, "audio_path": "a.wav", "question_text": "q", "multi_choice": [huge, huge], "answer": 0}]
    for i, rec in enumerate(lines):
        path.write_text(json.dumps(rec) + "\n")
        with pytest.raises(DataError, match=rf"{path}: line 1: ") as err:
            read_avqa(path, unique_choices=True)
        assert len(_one_line(err)) < 500, (i, len(str(err.value)))
    path.write_text('{"id": 1, "answer": ' + "9" * 5000 + "}\n")  # past Python's digit limit
    with pytest.raises(DataError, match=rf"{path}: line 1: malformed JSON"):
        read_avqa(path)


def test_a_huge_value_in_a_config_is_quoted_short(tmp_path):
    path = tmp_path / "c.yaml"
    for text in (f"run:\n  seed: '{'7' * 200_000}'\n", f"run:\n  {'k' * 200_000}: 1\n",
                 f"data:\n  format: '{'a' * 200_000}'\n", f"optimizer:\n  betas: [{', '.join(['0.5'] * 5_000)}]\n"):
        path.write_text(text)
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            load_config(path)
        assert len(_one_line(err)) < 500 and time.perf_counter() - start < 10


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
data:
  synthetic_tasks: *g
"""


def test_yaml_aliases_that_expand_past_a_configs_size_are_refused_by_name(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"{path}: holds [\d,]+ values once its YAML aliases are expanded") as err:
        load_config(path)
    assert time.perf_counter() - start < 5 and len(_one_line(err)) < 300
    path.write_text("run: &r\n  seed: *r\n")
    with pytest.raises(ConfigError, match="alias refers to the node that contains it"):
        load_config(path)
    with pytest.raises(ConfigError, match="aliases are expanded"):
        load_config(None, ["data.synthetic_tasks=" + BILLION_LAUGHS.split("data:")[0].replace("\n", ", ")
                           .join(["{", "}"])])


def test_an_unparsable_config_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: [1\n  steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path} is not valid YAML: line 3, column 8: expected ',' or ']'") as e:
        load_config(path)
    _one_line(e)
    path.write_text("run:\n  seed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: a value cannot be read") as e:
        load_config(path)
    _one_line(e)


# --------------------------------------------------------------------------- long clips


def test_a_long_clip_is_decoded_only_as_far_as_the_window_needs(tmp_path, monkeypatch):
    from data.audio import AudioLoader, load_audio

    rng = np.random.default_rng(0)
    for sr in (16000, 44100, 8000):
        path = tmp_path / f"long{sr}.wav"
        sf.write(path, rng.uniform(-0.5, 0.5, (sr * 40, 2)).astype(np.float32), sr, subtype="FLOAT")
        whole = load_audio(path)  # the reference: all of it decoded, resampled, then cut
        decoded = []
        read = sf.SoundFile.read

        def spy(self, *args, **kwargs):
            out = read(self, *args, **kwargs)
            decoded.append(len(out))
            return out

        monkeypatch.setattr(sf.SoundFile, "read", spy)
        wave = AudioLoader(max_seconds=3.0)(path)
        monkeypatch.undo()
        assert len(decoded) == 1 and decoded[0] < sr * 3.1, (sr, decoded)  # one read, of the window
        assert len(wave) == 48000
        np.testing.assert_allclose(wave, whole[:48000], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- a missing training clip


def test_a_missing_training_clip_names_the_sample_and_the_line(tmp_path):
    from data.audio import AudioError, AudioLoader
    from data.datasets import read_avqa
    from grpo.stream import PromptStream

    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"q{i}", "audio_path": "nope.wav", "question_text": "q",
                                          "multi_choice": ["a", "b"], "answer": 0}) for i in range(2)) + "\n")
    stream = PromptStream(read_avqa(path), AudioLoader(), seed=0, shuffle=False)
    with pytest.raises(AudioError, match=rf"^{path}: line 1: sample 'q0': .*nope.wav: audio file not found$"):
        stream.next()


def test_huge_values_in_a_manifest_or_a_predictions_file_are_quoted_short(tmp_path):
    from data.datasets import DataError
    from data.scoring import read_predictions
    from grpo.manifest import FORMAT, MANIFEST, ManifestError, read

    huge = "x" * 1_000_000
    for manifest in ({"format": huge, "hash": "sha256"},
                     {"format": FORMAT, "hash": "sha256", "block_bytes": 1, "files": {"../" + huge: {}}},
                     {"format": FORMAT, "hash": "sha256", "block_bytes": 1, "files": {huge: {}}}):
        (tmp_path / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match="format|not a path|no size") as err:
            read(tmp_path)
        assert len(_one_line(err)) < 500
    path = tmp_path / "predictions.json"
    for records in ([{"id": huge, "question": "q", "choices": [huge], "answer": 3}],):
        path.write_text(json.dumps(records))
        with pytest.raises(DataError, match=r"record 0 \(id 'x") as err:
            read_predictions(path)
        assert len(_one_line(err)) < 500
    path.write_text('[{"id": ' + "9" * 5000 + "}]")  # past Python's digit limit: one line, not a ValueError
    with pytest.raises(DataError, match=rf"{path}: not valid JSON"):
        read_predictions(path)


def test_evaluation_progress_files_are_never_removed_or_appended_through_a_link(tmp_path):
    from evaluation.answers import append_lines, read_progress, remove_tree

    other = _other_run(tmp_path)
    before = _snapshot(other)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "progress").symlink_to(other / "checkpoints")
    remove_tree(out / "progress")  # a stale progress folder that is a link: the link goes, not its target
    assert not (out / "progress").is_symlink() and _snapshot(other) == before
    (out / "progress").mkdir()
    (out / "progress" / "rank0.jsonl").symlink_to(other / "history.jsonl")
    with pytest.raises(OSError):
        append_lines(out / "progress" / "rank0.jsonl", ['{"index": 0}'])
    assert _snapshot(other) == before
    (out / "progress" / "rank1.jsonl").write_text('{"index": ' + "9" * 5000 + "}\n")  # not one of ours
    assert read_progress(out / "progress") == {}
