"""Property tests of every reader of a file a user hands the project: any bytes either parse or
end in the project's own error naming the file, never another exception.

Inputs are drawn three ways: arbitrary bytes; JSON (a list or JSON Lines) of records with the
readers' own field names and values of every JSON type; and that JSON cut short or with bytes
changed. Example counts are kept small so the whole file takes seconds.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.datasets import DataError, read_dataset
from data.scoring import read_predictions
from grpo.config import ConfigError, load_config

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ["id", "question", "question_text", "choices", "multi_choice", "answer", "audio_path", "audio_id",
          "task", "modality", "question_type", "model_prediction", "model_output", "model_completion"]
records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.lists(st.text(max_size=4), max_size=4),
                          max_size=len(FIELDS)) | json_values


@st.composite
def file_bytes(draw) -> bytes:
    """Arbitrary bytes, or records as a JSON list or JSON Lines, possibly cut or with bytes changed."""
    kind = draw(st.sampled_from(["bytes", "list", "lines"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    items = draw(st.lists(records, max_size=4))
    if kind == "list":
        data = json.dumps(items).encode()
    else:
        data = "".join(json.dumps(r) + "\n" for r in items).encode()
    cut = draw(st.one_of(st.none(), st.integers(0, max(len(data), 1))))
    if cut is not None:
        data = data[:cut]
    for at, byte in draw(st.lists(st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)),
                                  max_size=2)):
        if data:
            data = data[:at] + bytes([byte]) + data[at + 1:]
    return data


def _in_a_file(data: bytes, name: str):
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return folder, path


@pytest.mark.parametrize("fmt", ["avqa", "mmau", "mmar"])
@FAST
@given(data=file_bytes(), skip=st.booleans())
def test_dataset_readers_parse_or_name_the_file(fmt, data, skip):
    folder, path = _in_a_file(data, "questions.jsonl")
    try:
        samples = read_dataset(fmt, path, on_error="skip" if skip else "raise")
        assert isinstance(samples, list)
    except DataError as err:
        assert str(path) in str(err)
    finally:
        shutil.rmtree(folder)


@FAST
@given(data=file_bytes())
def test_the_predictions_reader_parses_or_names_the_file(data):
    folder, path = _in_a_file(data, "predictions.json")
    try:
        assert isinstance(read_predictions(path), list)
    except DataError as err:
        assert str(path) in str(err)
    finally:
        shutil.rmtree(folder)


PROGRESS_FIELDS = ["index", "completion", "error", "n_tokens", "truncated", "other"]
progress_rows = st.dictionaries(st.sampled_from(PROGRESS_FIELDS), json_values, max_size=5) | json_values


@FAST
@given(rows=st.lists(progress_rows, max_size=5), tail=st.binary(max_size=20))
def test_evaluation_progress_files_keep_only_whole_answers(rows, tail):
    """A killed evaluation's progress files (and anything else found there) never stop a rerun:
    a row that is not a whole answer is left out, to be generated again."""
    from evaluation.answers import Generated, read_progress

    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        (folder / "rank0.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + tail)
        done = read_progress(folder)
        for index, g in done.items():
            assert isinstance(g, Generated) and g.index == index and type(g.n_tokens) is int
            assert isinstance(g.completion, str) or isinstance(g.error, str)
    finally:
        shutil.rmtree(folder)


@FAST
@given(info=st.dictionaries(st.sampled_from(["fingerprint", "missing_audio", "completion_tokens", "truncated"]),
                            json_values, max_size=4) | json_values,
       records=st.lists(st.dictionaries(st.sampled_from(["id", "model_completion", "answer"]), json_values,
                                        max_size=3), max_size=3) | json_values)
def test_a_previous_evaluation_is_reused_only_when_whole(info, records):
    from types import SimpleNamespace

    from evaluation.answers import previous_results

    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        if isinstance(info, dict):
            info.setdefault("fingerprint", {"k": 1})
        (folder / "eval_info.json").write_text(json.dumps(info))
        (folder / "predictions.json").write_text(json.dumps(records))
        samples = [SimpleNamespace(id=str(i)) for i in range(len(records) if isinstance(records, list) else 1)]
        found = previous_results(folder, {"k": 1}, samples)
        if found is not None:
            assert sorted(found) == list(range(len(samples)))
            assert all(isinstance(g.completion, str) or isinstance(g.error, str) for g in found.values())
    finally:
        shutil.rmtree(folder)


config_values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=5), scalars, max_size=2)
SECTIONS = ["run", "model", "data", "rollout", "algorithm", "optimizer", "checkpointing", "logging", "lora",
            "distribution", "nonsense"]
KEYS = ["steps", "seed", "lr", "path", "group_size", "temperature", "betas", "every", "keep_last", "enabled",
        "rank", "format", "output_dir", "nonsense"]


@st.composite
def config_text(draw) -> bytes:
    """A YAML config: arbitrary bytes, or sections and keys (known and unknown) with any values."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=120))
    mapping = draw(st.dictionaries(st.sampled_from(SECTIONS),
                                   st.dictionaries(st.sampled_from(KEYS), config_values, max_size=3) | config_values,
                                   max_size=3))
    text = json.dumps(mapping).encode()  # JSON is YAML
    cut = draw(st.one_of(st.none(), st.integers(0, len(text))))
    return text if cut is None else text[:cut]


@FAST
@given(data=config_text())
def test_the_config_loader_parses_or_names_the_file(data):
    folder, path = _in_a_file(data, "config.yaml")
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err)
    finally:
        shutil.rmtree(folder)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """A real (small) checkpoint: a two-layer model and AdamW after one step."""
    import torch

    from grpo.checkpoint import save_training_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    run = tmp_path_factory.mktemp("fuzz-run")
    path = save_training_state(run, 1, model, optimizer, {"update": 1}, {"stream": {}}, rank=0, keep_last=1)
    return path, model, optimizer


@st.composite
def damage(draw, names: list[str]):
    """What to do to one file of a checkpoint: delete it, cut it, change bytes, or replace it."""
    name = draw(st.sampled_from(names))
    how = draw(st.sampled_from(["delete", "cut", "change", "replace"]))
    return name, how, draw(st.integers(0, 10**6)), draw(st.binary(max_size=64))


def _damage(path: Path, how: str, at: int, blob: bytes) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "cut":
        path.write_bytes(data[: at % (len(data) + 1)])
    elif how == "change":
        at = at % max(len(data), 1)
        path.write_bytes(data[:at] + blob + data[at + len(blob):])
    else:
        path.write_bytes(blob)


FILES = ["manifest.json", "trainer_state.json", "rank0.pt", "state/.metadata", "state/__0_0.distcp"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(harm=st.lists(damage(FILES), min_size=1, max_size=2), fix_manifest=st.booleans())
def test_the_checkpoint_verifier_and_loader_accept_or_name_the_file(saved_checkpoint, harm, fix_manifest):
    """Damaged files are found by the verifier before anything is loaded; with the manifest
    rewritten to match them (as someone who crafts a checkpoint would), loading still ends in
    a ResumeError naming the checkpoint, never another exception."""
    import torch

    from grpo import manifest
    from grpo.checkpoint import ResumeError, checkpoint_problem, load_training_state

    original, model, optimizer = saved_checkpoint
    folder = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    path = Path(shutil.copytree(original, folder / "checkpoints" / "step_1"))
    try:
        for name, how, at, blob in harm:
            if (path / name).exists():
                _damage(path / name, how, at, blob)
        if fix_manifest and not any(name == "manifest.json" for name, *_ in harm):
            manifest.write(path, manifest.record(path))
        problem = checkpoint_problem(path)
        assert problem is None or isinstance(problem, str) and "\n" not in problem
        if problem is not None:
            assert any(name in problem for name in FILES), problem
        before = [p.detach().clone() for p in model.parameters()]
        try:
            load_training_state(path, model, optimizer, rank=0)
            assert problem is None
        except ResumeError as err:
            assert str(path) in str(err)
            if problem is not None:  # found by the verifier: refused before anything was loaded
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    finally:
        shutil.rmtree(folder)


@FAST
@given(data=st.binary(max_size=300))
def test_dcp_metadata_is_read_or_refused_with_the_files_name(data):
    from grpo.checkpoint import ResumeError, read_dcp_metadata

    folder, path = _in_a_file(data, ".metadata")
    try:
        read_dcp_metadata(path)
    except ResumeError as err:
        assert str(path) in str(err)
    finally:
        shutil.rmtree(folder)


@FAST
@given(data=file_bytes())
def test_a_manifest_is_read_or_refused_with_the_files_name(data):
    from grpo import manifest

    folder, path = _in_a_file(data, manifest.MANIFEST)
    try:
        problem = manifest.verify(folder)
        assert problem is None or str(folder) in problem
    except manifest.ManifestError as err:
        assert str(path) in str(err)
    finally:
        shutil.rmtree(folder)
