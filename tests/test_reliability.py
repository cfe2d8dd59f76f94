"""What happens when things go wrong: bad values, bad samples, crashes, resumes, reused
directories, tampered files. Each test names the behaviour it pins down.
"""

from __future__ import annotations

import dataclasses
import typing

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
    from grpo.evaluation import EvalConfig, load_eval_config

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
