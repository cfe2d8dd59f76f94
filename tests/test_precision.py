"""bf16 that trains: an update of lr 1e-6 moves the weights on every training path (full
fine-tuning in fp32, FSDP2 with fp32 master weights and bf16 compute, LoRA's fp32 adapters over
a bf16 base); full fine-tuning of bf16 weights without FSDP is refused by name; LoRA merges in
fp32 and rounds once, also into an FSDP2 shard kept on the CPU (offload)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models import distributed as D
from models.lora import apply_lora, lora_delta, lora_modules, merge_adapters_, merged_state_dict
from models.policy import policy_logprobs
from tests.test_policy import batch  # noqa: F401  (a fixture: 2 clips, 2 prompts of different lengths)

LR = 1e-6
G = 2


@pytest.fixture
def one_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    D.init_distributed(device="cpu")
    yield
    D.cleanup()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def one_update(model, batch) -> tuple[dict, dict]:
    """One AdamW step of lr 1e-6 on -sum log pi of some completions; the trainable parameters
    (full tensors) before and after, those that got a gradient only."""
    ids = torch.randint(10, 200, (batch["input_ids"].shape[0] * G, 5), generator=torch.Generator().manual_seed(0))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: full(p) for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.0)
    (-policy_logprobs(model, batch, ids).sum()).backward()
    with_grad = {n for n, p in params.items() if p.grad is not None and full(p.grad).abs().max() > 0}
    optimizer.step()
    after = {n: full(p) for n, p in params.items()}
    return {n: before[n] for n in with_grad}, {n: after[n] for n in with_grad}


def assert_every_weight_moved(before: dict, after: dict) -> None:
    assert len(before) > 10
    unmoved = [n for n in before if torch.equal(before[n], after[n])]
    assert not unmoved, f"lr {LR} left {len(unmoved)} of {len(before)} tensors unchanged, e.g. {unmoved[:3]}"


def test_the_reason_bf16_weights_do_not_train():
    """What the refusal below prevents: at a weight's usual size a 1e-6 step vanishes in bf16."""
    w = torch.full((4,), 0.02, dtype=torch.bfloat16)
    assert torch.equal(w - LR, w)
    assert not torch.equal(w.float() - LR, w.float())


def test_full_fine_tuning_in_fp32_moves_every_weight(tiny_model, batch):
    assert_every_weight_moved(*one_update(tiny_model, batch))


def test_full_fine_tuning_of_bf16_weights_without_fsdp_is_refused_by_name():
    from grpo.config import Config, ConfigError
    from grpo.setup import load_policy_model

    cfg = Config()
    cfg.model.dtype, cfg.distribution.fsdp = "bfloat16", "never"
    with pytest.raises(ConfigError) as err:
        load_policy_model(cfg, torch.device("cpu"), fsdp=False, trainable=True)
    message = str(err.value)
    assert "\n" not in message
    assert "distribution.fsdp=never" in message and "model.dtype=bfloat16" in message and "lora.enabled" in message


def test_fsdp2_keeps_fp32_masters_computes_in_bf16_and_moves_every_weight(one_process_group, tiny_model, batch):
    """The trainer's FSDP2 path (what model.dtype bfloat16 gives under FSDP): the sharded
    parameters, which AdamW updates, stay fp32; MixedPrecisionPolicy's param_dtype is bf16."""
    model = D.shard_model(tiny_model, param_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {m._get_fsdp_state()._mp_policy.param_dtype for m in D._fsdp_modules(model)} == {torch.bfloat16}
    assert_every_weight_moved(*one_update(model, batch))


def test_lora_over_a_bf16_base_moves_its_fp32_adapters(tiny_model, batch):
    model = tiny_model.to(torch.bfloat16)
    apply_lora(model, rank=4, alpha=8.0, targets=["decoder"])
    before, after = one_update(model, batch)
    assert all(n.endswith("lora_B") for n in before)  # B = 0 at start: only B gets a gradient
    assert {after[n].dtype for n in after} == {torch.float32}
    assert_every_weight_moved(before, after)


def _with_trained_adapters(model, seed=1, scale=1e-3):
    apply_lora(model, rank=4, alpha=8.0, targets=["decoder"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=gen))
    return model


def test_merge_into_bf16_adds_in_fp32_and_rounds_once(tiny_model):
    """W' = round_bf16(W + (alpha / r) B A in fp32): the delta is not rounded to bf16 first
    (two roundings lose or move small updates)."""
    model = _with_trained_adapters(tiny_model.to(torch.bfloat16))
    expected = {id(m): (m.weight.float() + lora_delta(m.lora_A, m.lora_B, m.scaling)).to(torch.bfloat16)
                for m in lora_modules(model)}
    merge_adapters_(model)
    for m in lora_modules(model):
        assert m.weight.dtype == torch.bfloat16
        assert torch.equal(m.weight, expected[id(m)])
        assert not m.lora_B.any()


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_merge_under_fsdp2_writes_each_shard_in_place(one_process_group, tiny_checkpoint, cpu_offload):
    """merge_adapters_ on an FSDP2 model (its DTensor shards, kept on the CPU by offload) gives
    the plain model's merge: each rank's shard is written where it lives."""
    from models.loading import load_model

    plain = _with_trained_adapters(load_model(tiny_checkpoint, dtype=torch.float32))
    expected = merged_state_dict({k: v.detach().clone() for k, v in plain.state_dict().items()},
                                 plain.get_submodule(_first_lora_name(plain)).scaling)
    sharded = D.shard_model(_with_trained_adapters(load_model(tiny_checkpoint, dtype=torch.float32)),
                            cpu_offload=cpu_offload)
    shards = {n: p.to_local() for n, p in sharded.named_parameters()}
    merge_adapters_(sharded)
    got = D.full_state_dict(sharded)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    for n, p in sharded.named_parameters():  # the same storage, updated in place
        assert p.to_local().data_ptr() == shards[n].data_ptr(), n
        assert p.to_local().device.type == "cpu"


def _first_lora_name(model) -> str:
    return next(n for n, m in model.named_modules() if m in lora_modules(model))


def test_a_frozen_model_reshards_after_forward_whatever_was_asked(one_process_group, tiny_model, batch):
    """shard_model(frozen=True, reshard_after_forward=False): after a forward without gradients
    every unit is sharded again (FSDP2 would reshard it only in a backward that never comes)."""
    ids = torch.randint(10, 200, (batch["input_ids"].shape[0] * G, 5), generator=torch.Generator().manual_seed(0))
    reference = D.shard_model(tiny_model, frozen=True, reshard_after_forward=False)
    with torch.no_grad():
        policy_logprobs(reference, batch, ids)
    groups = [m._get_fsdp_state()._fsdp_param_group for m in D._fsdp_modules(reference)]
    groups = [g for g in groups if g is not None]
    assert len(groups) > 5 and all(g.is_sharded for g in groups)


def test_exports_are_written_in_the_model_dtype_by_default(tiny_model, tiny_checkpoint, tmp_path):
    """checkpointing.export_dtype=model: the export holds model.dtype's weights (bf16 on a GPU,
    half the fp32 masters' disk), the config says so; another dtype when named."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from grpo.checkpoint import checkpoint_exports
    from grpo.config import Config
    from grpo.trainer import Trainer
    from models.loading import load_generation_config, load_processor

    cfg = Config()
    cfg.model.dtype = "auto"
    on = lambda device: Trainer.export_dtype(SimpleNamespace(cfg=cfg, device=torch.device(device)))  # noqa: E731
    assert (on("cuda"), on("cpu")) == (torch.bfloat16, torch.float32)
    cfg.checkpointing.export_dtype = "float32"
    assert on("cuda") == torch.float32

    export = checkpoint_exports(tiny_model, load_processor(tiny_checkpoint), load_generation_config(tiny_checkpoint),
                                cfg.lora, export=True, is_main=True, dtype=torch.bfloat16)
    export(tmp_path / "hf")
    dtypes = set()
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    assert dtypes == {"BF16"}
    assert '"dtype": "bfloat16"' in (tmp_path / "hf" / "config.json").read_text()
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}  # the model itself untouched
