"""The memory plan (grpo/memory_plan.py, train.py --plan): every training config gets one, from
the config alone; the 7B recipes' verdicts; and its numbers against a measured peak."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import Qwen2AudioForConditionalGeneration  # noqa: F401  (imported once, outside the timing)

from grpo.config import load_config
from grpo.memory_plan import GB, plan_memory

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/*.yaml"))
# eval_*: evaluate.py's; *_random.yaml: model architectures (Qwen2-Audio-7B, Qwen2.5-Omni-3B/7B)
TRAINING = [c for c in CONFIGS if not c.name.startswith("eval_") and not c.name.endswith("_random.yaml")]


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_every_training_config_gets_a_plan_in_seconds(path):
    t0 = time.perf_counter()
    plan = plan_memory(load_config(path), world_size=1, gpu_memory_gb=80)
    assert time.perf_counter() - t0 < 10  # the 7B is built on the meta device: no weights
    text = plan.render()
    assert "weights (policy)" in text and "optimizer state" in text and "KV cache" in text
    assert ("fits with" in text) != ("does not fit" in text)
    assert plan.peak > 0


def test_the_lora_recipe_fits_one_24gb_gpu_and_the_full_recipe_8_x_80gb():
    lora = plan_memory(load_config(REPO / "configs" / "r1_aqa_lora_24gb.yaml"), world_size=1, gpu_memory_gb=24)
    assert lora.fits and lora.persistent["reference copy"] == 0
    assert 15 * GB < lora.persistent["weights (policy)"] < 17 * GB  # 8.4B frozen in bf16
    assert lora.setting["trainable"] < 100e6
    full = load_config(REPO / "configs" / "r1_aqa.yaml")
    assert plan_memory(full, world_size=8, gpu_memory_gb=80).fits
    one = plan_memory(full, world_size=1, gpu_memory_gb=80)
    assert not one.fits and "lora.enabled=true" in one.render()


def test_the_qwen2_5_omni_recipes_plan_on_the_thinkers_architectures():
    """Without a checkpoint the plan builds the thinker of model.architecture: Qwen2.5-Omni-7B's
    (8.9B with its never-called vision encoder, which never trains) and 3B's (4.7B)."""
    seven = plan_memory(load_config(REPO / "configs" / "r1_aqa_omni7b.yaml"), world_size=8, gpu_memory_gb=80)
    three = plan_memory(load_config(REPO / "configs" / "r1_aqa_omni3b.yaml"), world_size=8, gpu_memory_gb=80)
    assert seven.fits and three.fits
    assert 8.8e9 < seven.setting["params"] < 9.1e9 and 4.6e9 < three.setting["params"] < 4.8e9
    assert 0.6e9 < seven.setting["params"] - seven.setting["trainable"] < 0.7e9  # the vision encoder
    lora = plan_memory(load_config(REPO / "configs" / "r1_aqa_omni7b_lora_24gb.yaml"), world_size=1,
                       gpu_memory_gb=24)
    assert lora.fits and lora.persistent["reference copy"] == 0 and lora.setting["trainable"] < 100e6


def test_sharding_divides_the_persistent_state():
    cfg = load_config(REPO / "configs" / "r1_aqa.yaml")
    one, eight = plan_memory(cfg, world_size=1), plan_memory(cfg, world_size=8)
    for key in ("weights (policy)", "optimizer state (AdamW: 2 per trainable)", "reference copy"):
        assert eight.persistent[key] == pytest.approx(one.persistent[key] / 8)


def test_keeping_units_gathered_costs_the_policy_once_and_never_the_reference():
    """reshard_after_forward=false: the update holds the policy's gathered weights (compute
    dtype); the reference stays sharded (it reshards after every forward whatever the setting)."""
    from dataclasses import replace

    cfg = load_config(REPO / "configs" / "r1_aqa.yaml")
    gathered_cfg = replace(cfg, distribution=replace(cfg.distribution, reshard_after_forward=False))
    resharded, gathered = plan_memory(cfg, world_size=8), plan_memory(gathered_cfg, world_size=8)
    assert gathered.persistent["reference copy"] == resharded.persistent["reference copy"] > 0
    kept = gathered.update["FSDP units kept gathered (reshard_after_forward=false)"]
    assert kept == pytest.approx(resharded.setting["params"] * 2)  # bf16: 2 bytes a parameter
    assert sum(gathered.update.values()) > sum(resharded.update.values())


def test_the_log_softmax_chunk_is_the_configured_one():
    from dataclasses import replace

    cfg = load_config(REPO / "configs" / "r1_aqa.yaml")
    small = replace(cfg, model=replace(cfg.model, logprob_chunk_rows=256))
    key = "log-softmax chunk (fwd + bwd)"
    assert plan_memory(small, world_size=8).update[key] == pytest.approx(plan_memory(cfg, world_size=8).update[key] / 4)


def test_train_py_plan_prints_and_exits_and_explains_evaluation_configs():
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "train.py"), *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    out = run("--config", "configs/r1_aqa_lora_24gb.yaml", "--plan")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fits with" in out.stdout and "24 GB" in out.stdout
    out = run("--config", "configs/eval_tiny.yaml", "--plan")
    assert out.returncode == 0 and "evaluate.py config" in out.stdout


# The plan against the measured peak at the tiny demo's shape (within 15 %, full and LoRA) is
# checked once, on the run that also checks the README's row: tests/test_readme.py,
# test_the_tiny_plan_check_row_is_what_plan_check_prints.


def test_the_live_tensor_count_holds_when_a_freed_address_is_reused():
    """The allocator hands a storage freed since the previous op to the next one at the same
    address; the tracker must count the new storage (it drops dead entries before adding an
    op's outputs), whether or not the address is reused. At most 4 MiB are alive at once."""
    from benchmarks.plan_check import LiveTensors

    mib, tracker, kept = 2**20, LiveTensors(), []
    with tracker.mode:
        for _ in range(3):
            a = torch.ones(256, 1024)  # 1 MiB
            b = a * 2
            del a  # free: the next op's output may land at its address
            kept.append(b + 1)
            del b
    tracker._prune()
    assert tracker.peak == 4 * mib  # two kept, a and b; then three kept and b
    assert tracker.current == sum(k.untyped_storage().nbytes() for k in kept) == 3 * mib
