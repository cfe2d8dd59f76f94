"""Checkpoints from untrusted or damaged storage: nothing read from one runs code, a damaged
one is named before anything is loaded from it, and a save that fails leaves nothing behind.

Each crafted payload would create a marker file if it ran; the tests assert it does not exist.
"""

from __future__ import annotations

import errno
import hashlib
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from grpo import manifest
from grpo.checkpoint import (
    ResumeError,
    SaveError,
    checkpoint_problem,
    list_exports,
    load_training_state,
    resolve_resume,
    save_training_state,
)


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(run, step, model, optimizer, keep_last=3, **kwargs):
    return save_training_state(run, step, model, optimizer, {"update": step}, {"stream": {"position": step}}, rank=0,
                           keep_last=keep_last, **kwargs)


def _snapshot(model, optimizer):
    return ([p.detach().clone() for p in model.parameters()],
            [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)])


def _unchanged(model, optimizer, snapshot):
    params, moments = snapshot
    now = _snapshot(model, optimizer)
    return all(torch.equal(a, b) for a, b in zip(params, now[0])) and \
        all(torch.equal(a, b) for a, b in zip(moments, now[1]))


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_with_two(tmp_path):
    """A run with complete checkpoints at steps 1 and 2, and a model to load them into."""
    model, optimizer = _model_and_optimizer()
    run = tmp_path / "run"
    _save(run, 1, model, optimizer)
    _save(run, 2, model, optimizer)
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    return run, fresh, fresh_optimizer


# --------------------------------------------------------------------------- nothing runs code


def test_dcp_metadata_that_would_run_code_is_refused_before_anything_changes(run_with_two, tmp_path):
    """torch reads state/.metadata with plain pickle.load; a crafted one (its manifest rewritten
    to match, as whoever crafts it would) is refused without running."""
    run, model, optimizer = run_with_two
    ckpt = run / "checkpoints" / "step_2"
    marker = tmp_path / "code-ran"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    manifest.write(ckpt, manifest.record(ckpt))
    before = _snapshot(model, optimizer)
    with pytest.raises(ResumeError, match=r"step_2/state/\.metadata: refused to load.*os\.system|posix\.system"):
        load_training_state(ckpt, model, optimizer, rank=0)
    assert not marker.exists(), "the pickled call ran"
    assert _unchanged(model, optimizer, before)


def test_a_call_hidden_inside_real_dcp_metadata_is_refused(run_with_two, tmp_path):
    from grpo.checkpoint import read_dcp_metadata

    run, model, optimizer = run_with_two
    ckpt = run / "checkpoints" / "step_2"
    metadata = read_dcp_metadata(ckpt / "state" / ".metadata")  # the real thing reads
    marker = tmp_path / "code-ran"
    metadata.planner_data = {"x": RunsCode(marker)}
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ResumeError, match="refused to load"):
        read_dcp_metadata(ckpt / "state" / ".metadata")
    assert not marker.exists()


def test_a_dcp_value_that_would_run_code_is_refused_before_anything_changes(run_with_two, tmp_path):
    """DCP stores non-tensor values (the optimizer's lr, betas...) with torch.save, and its
    default planner loads them with weights_only=False."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run, model, optimizer = run_with_two
    ckpt = run / "checkpoints" / "step_2"
    marker = tmp_path / "code-ran"
    crafted, crafted_optimizer = _model_and_optimizer(seed=2)
    model_sd, optim_sd = get_state_dict(crafted, crafted_optimizer)
    optim_sd["param_groups"][0]["lr"] = RunsCode(marker)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt / "state"))
    manifest.write(ckpt, manifest.record(ckpt))
    before = _snapshot(model, optimizer)
    with pytest.raises(ResumeError, match=r"__0_0\.distcp \(optim\.param_groups\.0\.lr\): refused to load"):
        load_training_state(ckpt, model, optimizer, rank=0)
    assert not marker.exists(), "the pickled call ran"
    assert _unchanged(model, optimizer, before)


def test_a_checkpoint_round_trips_through_the_restricted_readers(tmp_path):
    model, optimizer = _model_and_optimizer()
    model.to(torch.bfloat16)  # another dtype in the metadata
    path = _save(tmp_path / "run", 3, model, optimizer)
    fresh, fresh_optimizer = _model_and_optimizer(seed=4)
    fresh.to(torch.bfloat16)
    trainer_state, rank_state = load_training_state(path, fresh, fresh_optimizer, rank=0)
    assert trainer_state["step"] == 3 and rank_state["stream"] == {"position": 3}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-3


# --------------------------------------------------------------------------- verified before loading


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, harm, says", [
    ("state/__0_0.distcp", _truncate, r"state/__0_0\.distcp is truncated: 100 bytes, \d+ when saved"),
    ("state/__0_0.distcp", _flip, r"state/__0_0\.distcp was altered: bytes 0-\d+ differ"),
    ("state/.metadata", Path.unlink, r"state/\.metadata is missing"),
    ("rank0.pt", _flip, r"rank0\.pt was altered"),
    ("trainer_state.json", lambda p: p.write_text("{"), r"trainer_state\.json is truncated: 1 bytes"),
    ("manifest.json", Path.unlink, r"manifest\.json is missing: the checkpoint cannot be verified"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_the_newest_that_verifies(
        run_with_two, name, harm, says):
    run, model, optimizer = run_with_two
    ckpt = run / "checkpoints" / "step_2"
    harm(ckpt / name)
    before = _snapshot(model, optimizer)
    for attempt in (lambda: resolve_resume(run, "latest"), lambda: resolve_resume(run, str(ckpt)),
                    lambda: load_training_state(ckpt, model, optimizer, rank=0)):
        with pytest.raises(ResumeError, match=says) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message
        assert f"the newest checkpoint that verifies is {run / 'checkpoints' / 'step_1'}" in message
    assert _unchanged(model, optimizer, before)


def test_resume_latest_names_the_checkpoint_and_what_it_passes_over(run_with_two, caplog):
    run, _, _ = run_with_two
    (run / "checkpoints" / ".tmp_step_3").mkdir()  # a save that never finished
    with caplog.at_level("INFO", logger="grpo.checkpoint"):
        assert resolve_resume(run, "latest") == run / "checkpoints" / "step_2"
    text = caplog.text
    assert ".tmp_step_3" in text and "not a complete checkpoint" in text
    assert "step_2 (step 2) is the newest complete checkpoint, and it verifies" in text


def test_the_manifest_lists_every_file_and_pruning_keeps_it_true(tmp_path):
    model, optimizer = _model_and_optimizer()
    run = tmp_path / "run"

    def export(out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"weights")

    first = _save(run, 1, model, optimizer, keep_last=1, export_fn=export)
    assert set(manifest.read(first)["files"]) == {"state/.metadata", "state/__0_0.distcp", "rank0.pt",
                                                   "trainer_state.json", "hf/model.safetensors"}
    _save(run, 2, model, optimizer, keep_last=1, export_fn=export)
    assert set(manifest.read(first)["files"]) == {"trainer_state.json", "hf/model.safetensors"}
    assert manifest.verify(first) is None  # the export is still checked
    assert "not listed" in checkpoint_problem(first)


def test_old_exports_are_pruned_but_never_the_newest_nor_a_resumable_ones(tmp_path, caplog):
    model, optimizer = _model_and_optimizer()
    run = tmp_path / "run"
    elsewhere = tmp_path / "someone_elses_export"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"theirs")

    def export(out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"weights")

    def hf_steps():
        return [int(p.parent.name.split("_")[1]) for p in list_exports(run)]

    for step in (1, 2, 3):
        _save(run, step, model, optimizer, keep_last=1, keep_exports=2, export_fn=export)
    assert hf_steps() == [2, 3]
    step_1 = run / "checkpoints" / "step_1"
    assert manifest.verify(step_1) is None and (step_1 / "trainer_state.json").is_file()  # the manifest follows
    # a full state kept (keep_last=2) keeps its export even beyond keep_exports=1
    _save(run, 4, model, optimizer, keep_last=2, keep_exports=1, export_fn=export)
    assert hf_steps() == [3, 4]
    # an export reached through a link is never deleted through it
    shutil.rmtree(run / "checkpoints" / "step_3" / "hf")
    (run / "checkpoints" / "step_3" / "hf").symlink_to(elsewhere)
    with caplog.at_level("WARNING"):
        _save(run, 5, model, optimizer, keep_last=1, keep_exports=1, export_fn=export)
    assert (elsewhere / "model.safetensors").read_bytes() == b"theirs"
    assert any("not pruning the export" in r.getMessage() for r in caplog.records)
    assert hf_steps() == [3, 5]  # step 4's own export pruned, the linked one left, the newest kept
    # 0 keeps every export
    _save(run, 6, model, optimizer, keep_last=1, keep_exports=0, export_fn=export)
    assert hf_steps() == [3, 5, 6]


# --------------------------------------------------------------------------- a save that fails


def _fail_dcp_write(monkeypatch, run):
    import torch.distributed.checkpoint.filesystem as fs

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / ".tmp_step_3" / "state"))

    monkeypatch.setattr(fs, "_write_item", no_space)


def _fail_export(monkeypatch, run):
    def over_quota(out_dir):
        out_dir.mkdir()
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(out_dir / "model.safetensors"))

    return over_quota


def _fail_manifest(monkeypatch, run):
    def denied(root, recorded):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(root) / "manifest.json"))

    monkeypatch.setattr(manifest, "write", denied)


@pytest.mark.parametrize("fault, says", [
    (_fail_dcp_write, r"no space left on device \(.*\.tmp_step_3/state\) \[errno ENOSPC\]"),
    (_fail_export, r"disk quota exceeded \(.*model\.safetensors\) \[errno EDQUOT\]"),
    (_fail_manifest, r"permission denied \(.*manifest\.json\) \[errno EACCES\]"),
])
def test_a_failed_save_is_one_line_and_leaves_nothing_behind(run_with_two, monkeypatch, fault, says):
    run, model, optimizer = run_with_two
    before = {step: _digest(run / "checkpoints" / f"step_{step}") for step in (1, 2)}
    export_fn = fault(monkeypatch, run)
    with pytest.raises(SaveError) as err:
        _save(run, 3, model, optimizer, keep_last=1, export_fn=export_fn)
    message = str(err.value)
    assert "\n" not in message
    assert f"could not save the checkpoint of step 3 to {run / 'checkpoints' / 'step_3'}" in message
    assert re.search(says, message), message
    assert f"the newest complete checkpoint is {run / 'checkpoints' / 'step_2'} (step 2)" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]  # no .tmp_step_3
    monkeypatch.undo()
    assert {step: _digest(run / "checkpoints" / f"step_{step}") for step in (1, 2)} == before  # not pruned
    assert checkpoint_problem(run / "checkpoints" / "step_2") is None
