"""LoRA (models/lora.py) and the trainer with lora.enabled: the adapters' exactness, what
trains, the merged export, the reference as the adapters switched off, exact resume, and the
LoRA variant of the tiny demo learning as the full fine-tune does (with a flipped-sign control)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import both_families
from models.lora import (
    LoRALinear,
    adapters_cast_once,
    adapters_disabled,
    apply_lora,
    count_adapter_parameters,
    load_adapters,
    lora_modules,
    merge_adapters_,
    merged_state_dict,
    save_adapters,
)
from models.policy import policy_logprobs, text_decoder
from tests.test_trainer import TINY, final_export, history, max_weight_difference, train, weights

from tests.test_policy import batch  # noqa: F401  (a fixture: 2 clips, 2 prompts of different lengths, left padded)

G = 3


@pytest.fixture
def prompts(batch):
    """The policy tests' batch: the same processor inputs the LoRA paths are compared on."""
    return batch


@pytest.fixture
def completion_ids():
    return torch.randint(0, 300, (2 * G, 6), generator=torch.Generator().manual_seed(0))  # [N, T]


def adapted(model, *, seed=1, targets=("decoder",), random_b=True):
    """``model`` with LoRA on ``targets``; with ``random_b`` the adapters are moved off zero
    (as training would), so that they change the output."""
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=list(targets))
    if random_b:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(model):
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=gen))
    return model


def logprobs(model, prompts, ids):
    return policy_logprobs(model, prompts, ids)  # [N, T]


# ----------------------------------------------------------------------------- the adapter itself


def test_lora_linear_computes_the_equation():
    """h = W x + b + (alpha / r) B A x, with B = 0 at init (so h = W x + b exactly)."""
    base = torch.nn.Linear(5, 3)
    W, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=6.0)
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), x @ W.T + b)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ W.T + b + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    assert layer.weight is base.weight  # the base parameter is taken over, not copied


def test_adapters_cast_once_computes_the_same_from_one_cast(monkeypatch):
    """Inside adapters_cast_once the bf16 layer gives what it gives outside, from A and B cast
    once on entry (a later change of the fp32 masters is not seen until the block ends)."""
    base = torch.nn.Linear(6, 4).to(torch.bfloat16)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    outside = layer(x)
    with adapters_cast_once(layer, torch.bfloat16):
        assert torch.equal(layer(x), outside)
        with torch.no_grad():
            layer.lora_B.mul_(2.0)
        assert torch.equal(layer(x), outside)  # the cast copies, made once, are what the layer uses
    assert not torch.equal(layer(x), outside)  # after the block: the masters again


@both_families
@pytest.mark.parametrize("targets", [["decoder"], ["decoder", "audio_encoder", "projector"]])
def test_adapter_forward_at_init_equals_the_base_model(tiny_model, tiny_checkpoint, prompts, completion_ids, targets):
    from models.loading import load_model

    base = load_model(tiny_checkpoint, dtype=torch.float32).eval()
    model = adapted(tiny_model, targets=targets, random_b=False)
    assert torch.equal(logprobs(model, prompts, completion_ids), logprobs(base, prompts, completion_ids))


@both_families
def test_targets_select_modules_by_name(tiny_model):
    names = apply_lora(tiny_model, rank=2, alpha=4.0, targets=["decoder"])
    layers = tiny_model.config.text_config.num_hidden_layers
    assert len(names) == 7 * layers  # q, k, v, o, gate, up, down in every decoder layer
    decoder = {id(m): n for n, m in tiny_model.named_modules()}[id(text_decoder(tiny_model))]
    assert decoder in ("model.language_model", "model")  # the decoder's path differs across releases
    assert all(n.startswith(decoder + ".layers.") for n in names)
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_model, rank=2, alpha=4.0, targets=[r"nothing\.here"])


@both_families
def test_only_adapter_parameters_receive_gradients(tiny_model, prompts, completion_ids):
    model = adapted(tiny_model, targets=["decoder", "audio_encoder", "projector"]).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count_adapter_parameters(model)
    logprobs(model, prompts, completion_ids).sum().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name  # every adapter, encoder's included
        else:
            assert p.grad is None, name


# ----------------------------------------------------------------------------- merge and export


@both_families
def test_merge_then_export_loads_with_plain_transformers_and_equals_the_adapted_model(
        tiny_model, tiny_processor, prompts, completion_ids, tmp_path):
    import transformers

    from models.distributed import export_checkpoint
    from models.loading import load_generation_config

    model = adapted(tiny_model, targets=["decoder", "audio_encoder", "projector"])
    expected = logprobs(model, prompts, completion_ids)
    out = export_checkpoint(model, tiny_processor, load_generation_config(tiny_model.name_or_path), tmp_path / "hf",
                            transform=lambda state: merged_state_dict(state, 8.0 / 4))
    assert not any("lora" in k for k in weights(out))  # a plain checkpoint: no adapter keys
    plain = getattr(transformers, type(tiny_model).__name__)  # the family's own transformers class
    exported = plain.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logprobs(exported, prompts, completion_ids), expected, atol=1e-5, rtol=1e-5)

    merge_adapters_(model)  # in place: same function, fresh adapters (B back to zero)
    assert all(m.lora_B.abs().sum() == 0 for m in lora_modules(model))
    torch.testing.assert_close(logprobs(model, prompts, completion_ids), expected, atol=1e-5, rtol=1e-5)
    with adapters_disabled(model):  # the base is now the merged model
        torch.testing.assert_close(logprobs(model, prompts, completion_ids), expected, atol=1e-5, rtol=1e-5)


@both_families
def test_adapters_save_and_load_as_safetensors(tiny_checkpoint, prompts, completion_ids, tmp_path):
    from models.loading import load_model

    model = adapted(load_model(tiny_checkpoint).eval())
    save_adapters(model.state_dict(), tmp_path / "adapter", rank=4, alpha=8.0, dropout=0.0, targets=["decoder"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["rank"] == 4
    fresh = adapted(load_model(tiny_checkpoint).eval(), random_b=False)
    load_adapters(fresh, tmp_path / "adapter")
    assert torch.equal(logprobs(fresh, prompts, completion_ids), logprobs(model, prompts, completion_ids))


# ----------------------------------------------------------------------------- the reference


@both_families
def test_adapters_off_equal_a_separately_loaded_base_model(tiny_model, tiny_checkpoint, prompts, completion_ids):
    from models.loading import load_model

    model = adapted(tiny_model)
    on = logprobs(model, prompts, completion_ids)
    with adapters_disabled(model):
        off = logprobs(model, prompts, completion_ids)
    base = logprobs(load_model(tiny_checkpoint, dtype=torch.float32).eval(), prompts, completion_ids)
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-3  # the adapters did change the model
    assert torch.equal(logprobs(model, prompts, completion_ids), on)  # switched back on after the block


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    from data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("lora")
    train_path = generate_synthetic(root / "data", n=32, seed=0, tasks=["pitch", "tone_or_noise"], split="train")
    eval_path = generate_synthetic(root / "data", n=4, seed=1, tasks=["pitch", "tone_or_noise"], split="eval")
    return {"root": root, "model": tiny_checkpoint, "train": train_path, "eval": eval_path}


WARMUP, GRPO_STEPS = 3, 4


def lora_run(world, out: Path, *extra: str) -> list[str]:
    """A short LoRA run: warm-up (adapters merged at its end), then GRPO with the KL to the
    adapters-off model, mu = 2, dropout on."""
    return [
        "--config", str(TINY), f"run.output_dir={out}", f"run.steps={GRPO_STEPS}",
        f"model.path={world['model']}", "model.build_tiny=false",
        f"data.train_path={world['train']}", f"data.eval_path={world['eval']}", "data.synthetic_generate=false",
        "data.eval_every=0", "rollout.prompts_per_step=4", "rollout.group_size=4",
        "rollout.generation_batch_prompts=2", "rollout.max_new_tokens=8",
        f"algorithm.format_warmup_steps={WARMUP}", "algorithm.format_warmup_lr=5e-3", "algorithm.mu=2",
        "algorithm.micro_batch_prompts=2", "optimizer.lr=3e-3",
        "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1",
        "logging.sample_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        *extra,
    ]


def test_the_trainer_reference_is_the_base_with_adapters_off(world, tmp_path):
    """The step's reference with LoRA: no reference copy is built, and log pi_ref is the
    separately loaded base model's (before the warm-up merged anything)."""
    from grpo.config import load_config
    from grpo.rollout import prompt_batch
    from grpo.trainer import Trainer
    from models.distributed import DistInfo
    from models.loading import load_model

    cfg = load_config(TINY, lora_run(world, tmp_path / "run")[2:] + ["algorithm.format_warmup_steps=0"])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        assert trainer.reference.kind == "adapters_off"  # no copy
        with torch.no_grad():
            for m in lora_modules(trainer.model):  # adapters that matter, as after some training
                m.lora_B.normal_(std=0.05)
        samples = trainer.train_samples[:2]
        waves = [trainer.load_audio(s.audio_path) for s in samples]
        inputs = prompt_batch(samples, waves, trainer.processor, cfg.data.prompt_template, trainer.device)
        ids = torch.randint(0, 300, (2 * 4, 5), generator=torch.Generator().manual_seed(0))
        trainer.model.eval()
        with torch.no_grad():
            with trainer.reference.policy() as reference:
                assert reference is trainer.model
                ref = policy_logprobs(reference, inputs, ids)
            base = policy_logprobs(load_model(world["model"]).eval(), inputs, ids)
            policy = policy_logprobs(trainer.model, inputs, ids)
        assert ref.shape == (8, 5) and torch.equal(ref, base)
        assert (policy - base).abs().max() > 1e-3
    finally:
        trainer.close()


def test_without_kl_there_is_no_reference_pass(world, tmp_path):
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, lora_run(world, tmp_path / "run")[2:] + ["algorithm.beta=0"])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    try:
        with trainer.reference.policy() as reference:
            assert reference is None
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- runs: export, resume


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["root"] / "uninterrupted"
    train(lora_run(world, out, "checkpointing.every=2", "checkpointing.keep_last=5"))
    return out


def test_a_lora_run_exports_a_plain_merged_model_and_the_adapters(world, uninterrupted):
    from transformers import Qwen2AudioForConditionalGeneration

    rows = history(uninterrupted)
    assert [r["step"] for r in rows] == list(range(1, WARMUP + GRPO_STEPS + 1))
    grpo = rows[WARMUP:]
    assert all(r["train/kl"] >= 0 for r in grpo)  # k3 against the adapters-off model
    final = final_export(uninterrupted)
    Qwen2AudioForConditionalGeneration.from_pretrained(final)  # loads with no extra code
    assert not any("lora" in k for k in weights(final))
    assert max_weight_difference(final, world["model"]) > 1e-4  # the merged adapters moved the weights
    assert (final.parent / "adapter" / "adapter_model.safetensors").is_file()
    # during the warm-up the checkpoint holds only the adapters (the base is model.path's)
    from torch.distributed.checkpoint import FileSystemReader

    during = FileSystemReader(str(uninterrupted / "checkpoints" / "step_2" / "state")).read_metadata()
    model_keys = [k for k in during.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(k.endswith((".lora_A", ".lora_B")) for k in model_keys)


@pytest.mark.parametrize("resume_at", [2, 4])  # during the warm-up (adapters only), after its merge (with the base)
def test_resume_with_lora_is_exact(world, uninterrupted, tmp_path, resume_at):
    out = tmp_path / "resumed"
    checkpoint = uninterrupted / "checkpoints" / f"step_{resume_at}"
    train([*lora_run(world, out, "checkpointing.every=2"), "--resume", str(checkpoint)])
    resumed, reference = history(out), history(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(resume_at + 1, WARMUP + GRPO_STEPS + 1))
    for a, b in zip(resumed, reference[resume_at:]):
        for key in ("train/loss", "train/reward", "train/kl", "train/grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert max_weight_difference(final_export(out), final_export(uninterrupted)) < 1e-6


# ----------------------------------------------------------------------------- LoRA learns


def lora_learning_run(root: Path, name: str, *extra: str) -> list[dict]:
    """configs/tiny_lora.yaml as a user runs it (its own fresh model and data under ``root``),
    one thread: the float path of benchmarks/results/seeds-cpu-lora.md."""
    out = root / name
    train(["--config", str(TINY.parent / "tiny_lora.yaml"), f"run.output_dir={out}",
           f"model.path={root / 'model'}", f"data.train_path={root / 'data' / 'train.jsonl'}",
           f"data.eval_path={root / 'data' / 'eval.jsonl'}", "logging.progress_bar=false",
           "logging.tensorboard=false", "checkpointing.export=false", *extra], timeout=1800, threads=1)
    return history(out)


@pytest.fixture(scope="module")
def lora_learning(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-learning")


@pytest.mark.slow
def test_grpo_with_lora_learns_the_synthetic_audio_questions(lora_learning):
    """configs/tiny_lora.yaml: after the label-free warm-up (chance), GRPO training only the
    adapters takes held-out greedy accuracy on pitch and on tone-or-noise to >= 0.95 each, the
    bar of the full fine-tune's demo (seeds-cpu-lora.md: the same on seeds 0-9)."""
    rows = lora_learning_run(lora_learning, "grpo")
    evals = [r for r in rows if "eval/greedy_accuracy" in r]
    warm = [r for r in evals if r["train/phase"] == 0.0]
    assert warm and warm[-1]["eval/greedy_accuracy"] <= 0.65, "the warm-up alone must not solve the task"
    assert warm[-1]["eval/greedy_accuracy/pitch"] <= 0.7, warm[-1]
    final = evals[-1]
    assert final["step"] == 200, final
    for task in ("pitch", "tone_or_noise"):
        assert final[f"eval/greedy_accuracy/{task}"] >= 0.95, (task, final)
    assert final["eval/greedy_accuracy"] >= 0.95, final


@pytest.mark.slow
def test_lora_control_flipped_advantages_do_not_learn(lora_learning):
    """Same run, advantages negated: the adapters are pushed away from the reward, so what the
    run above learns comes from the reward's sign, not from the warm-up or the recipe."""
    rows = lora_learning_run(lora_learning, "flipped", "algorithm.flip_advantage_sign=true")
    final = [r for r in rows if "eval/greedy_accuracy" in r][-1]
    assert final["step"] == 200 and final["eval/greedy_accuracy"] <= 0.6, final
    late = [r["train/rewards/accuracy/mean"] for r in rows if "train/rewards/accuracy/mean" in r][-25:]
    assert sum(late) / len(late) <= 0.6, late


def test_a_run_saved_before_the_lora_keys_resumes_without_a_config_change():
    from grpo.config import Config, config_changes, to_dict

    saved = to_dict(Config())
    del saved["lora"]  # a config.yaml written before the section existed
    assert config_changes(saved, to_dict(Config()), defaults=to_dict(Config())) == []
    on = Config()
    on.lora.enabled = True
    assert [c[0] for c in config_changes(saved, to_dict(on), defaults=to_dict(Config()))] == ["lora.enabled"]


def test_lora_under_fsdp2_with_activation_checkpointing_trains_like_a_plain_process(world, uninterrupted, tmp_path):
    """FSDP2 with activation checkpointing: the adapters shard, the warm-up merge updates the
    shard of W, and the run matches the unsharded one."""
    out = tmp_path / "fsdp"
    train(lora_run(world, out, "checkpointing.every=2", "checkpointing.keep_last=5", "distribution.fsdp=always",
                   "distribution.activation_checkpointing=true"))
    rows, reference = history(out), history(uninterrupted)
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6), a["step"]
    assert max_weight_difference(final_export(out), final_export(uninterrupted)) < 1e-4


@pytest.mark.slow
def test_lora_on_two_processes_trains_like_one(world, tmp_path):
    """2 ranks (FSDP2) against 1 plain process, without dropout (its masks are per rank)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(lora_run(world, one, "lora.dropout=0"))
    train(lora_run(world, two, "lora.dropout=0", "distribution.activation_checkpointing=true"), nproc=2)
    for a, b in zip(history(two), history(one)):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6), a["step"]
    assert max_weight_difference(final_export(two), final_export(one)) < 1e-4
