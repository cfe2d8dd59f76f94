"""models/distributed.py: FSDP2 sharding, rollout gathering and export, on CPU with gloo.

The two-process checks run once, under torchrun, in tests/dist_worker.py (one launch for all
scenarios: importing torch and transformers twice costs most of the time); each test below
reads its scenario's result. The single-process checks run here, in a one-process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import both_families
from models import distributed as D

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
LAUNCH_TIMEOUT_S = 300  # the whole two-process run takes about 20 s on two cores
GRAD_ATOL = 1e-5


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_ranks(tiny_checkpoint, tmp_path_factory):
    """Run every scenario of tests/dist_worker.py on 2 CPU processes; return (out_dir, log)."""
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]
    # a new session, so that a hang can be killed with all of torchrun's children
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        status = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
        status = f"killed after {LAUNCH_TIMEOUT_S} s (a hang?)"
    return out, f"{status}\n{log[-4000:]}"


def result(two_ranks, name: str) -> dict:
    """The scenario's result from rank 0; fails with the worker's traceback or log."""
    out, log = two_ranks
    for path in sorted(out.glob(f"{name}.rank*.json")):
        pytest.fail(f"{name} failed on another rank:\n{json.loads(path.read_text())['error']}")
    path = out / f"{name}.json"
    if not path.exists():
        pytest.fail(f"scenario {name!r} wrote no result ({log})")
    data = json.loads(path.read_text())
    if not data["ok"]:
        pytest.fail(f"scenario {name!r} failed:\n{data['error']}")
    # every scenario: each rank issued the same collectives, in the same order, with the same sizes
    assert data["collectives"]["same"], (name, data["collectives"])
    assert min(data["collectives"]["counts"]) > 0, (name, data["collectives"])
    return data


@pytest.mark.slow
@both_families
def test_sharded_gradient_equals_single_process(two_ranks):
    """(a) Each rank gets half of the batch; the FSDP-reduced full gradient equals the
    single-process whole-batch gradient, for mean (loss x world size) and sum reduction,
    with activation checkpointing, without resharding, and with gradient accumulation over
    micro-batches, each reduce-scattering (what the trainer does), and through the trainer's
    shared-prefix, real-frames log-prob path against the plain per-row, whole-window one."""
    r = result(two_ranks, "grads")
    assert r["n_params_with_grad"] > 50
    first, last = r["accumulation_reduce_scatters"]
    assert first > 0 and last > 0  # every micro-batch reduce-scatters its gradient
    for variant in ("mean", "sum", "checkpointing", "no_reshard", "accumulation", "shared_prefix",
                    "shared_prefix_checkpointing"):
        assert r[variant]["max_abs"] < GRAD_ATOL, (variant, r[variant])
        assert r[variant]["max_rel"] < 1e-4, (variant, r[variant])


@pytest.mark.slow
@both_families
def test_generation_with_different_lengths_does_not_hang(two_ranks):
    """(b) Rank 0 decodes to max_new_tokens while rank 1 stops after one token: inside
    gathered_params this needs no lockstep and no all-gather per token; outside it, with
    sync_ranks, the ranks stay in lockstep. Training is unaffected afterwards."""
    ranks = result(two_ranks, "generation")["ranks"]
    inside = [r["inside"] for r in ranks]
    assert [r["width"] for r in inside] == [8, 1]  # different numbers of decode steps
    assert [r["all_gathers"] for r in inside] == [0, 0]  # parameters stayed unsharded
    synced = [r["sync_ranks"] for r in ranks]
    assert [r["width"] for r in synced] == [8, 8]  # lockstep: rank 1 pads while rank 0 decodes
    assert synced[1]["padded_after_first"]  # rank 1 still ended at its first token
    assert all(r["all_gathers"] > 0 for r in synced)  # resharded again after gathered_params
    assert all(r["grads_after_max_abs"] < GRAD_ATOL for r in ranks)


@pytest.mark.slow
@both_families
def test_export_from_sharded_model_reloads_unchanged(two_ranks):
    """(c) export_checkpoint from the 2-rank sharded (and checkpoint-wrapped) model:
    from_pretrained gives the same parameters, AutoProcessor the same prompts and inputs."""
    r = result(two_ranks, "export")
    assert r["param_max_abs"] == 0.0
    assert r["dtype"] == "torch.float32"
    assert r["same_text"] and r["same_inputs"]
    assert r["processor_class"] == "Qwen2AudioProcessor"
    assert r["leftover_tmp_dirs"] == []


@pytest.mark.slow
@both_families
def test_sharded_reference_matches_policy_and_has_no_grads(two_ranks):
    """(d) shard_model(frozen=True): same log-probs as the sharded policy at init, no grads,
    eval mode."""
    r = result(two_ranks, "reference")
    assert r["logp_max_abs"] < 1e-6
    assert not r["ref_requires_grad"] and not r["ref_has_grad"] and not r["ref_training"]
    assert r["policy_has_grad"]


@pytest.mark.slow
@both_families
def test_sharded_optimizer_steps_equal_single_process(two_ranks):
    """(e) Two clipped AdamW steps on the sharded model (and with CPU offload) end at the
    single-process parameters; clip_grad_norm_ sees the same global norm."""
    r = result(two_ranks, "optimizer")
    for variant in ("sharded", "cpu_offload"):
        assert r[variant]["norms"] == pytest.approx(r["single_norms"], rel=1e-5), variant
        # lr 1e-2: Adam turns 1e-7 gradient noise on near-zero gradients into larger steps
        assert r[variant]["param_max_abs"] < 1e-4, (variant, r[variant])


@pytest.mark.slow
@both_families
def test_update_with_loss_tokens_straddling_the_lm_head_chunk_runs_the_same_collectives(two_ranks):
    """(f) grpo.step.policy_update on 2 ranks whose own loss-token widths would give 1 and 2
    lm_head chunks: the widths are agreed, so both ranks issue the same collectives in each
    update (else gloo fails on the mismatch, or the collective timeout ends a hang), and the
    updates are taken."""
    r = result(two_ranks, "update_straddle")
    assert r["updates"] == 2 and r["losses_finite"]
    for step in r["steps"]:
        assert step["same"], step
        assert step["counts"][0] > 0


# ----------------------------------------------------------------------------- one process


@pytest.fixture
def single_process_group(monkeypatch):
    """init_distributed() as a plain (un-launched) script sees it; destroyed afterwards."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    info = D.init_distributed(device="cpu")
    yield info
    D.cleanup()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
@both_families
def test_cleanup_tears_the_process_group_down_before_exit(two_ranks):
    """After sharded models were used and dropped, cleanup() leaves no gloo worker thread alive
    on any rank: the process group is destroyed then, not during interpreter exit (where a
    worker releasing a tensor after Python began finalising aborts the process)."""
    out, log = two_ranks
    for rank in (0, 1):
        path = out / f"shutdown.threads.rank{rank}.json"
        assert path.exists(), f"rank {rank} did not reach the end of cleanup ({log})"
        threads = json.loads(path.read_text())
        assert threads["before"] > 0, "no gloo worker thread found by name: the check would see nothing"
        assert threads["after"] == 0, (rank, threads)


def test_torn_down_on_exit_synchronises_only_a_body_that_ended(monkeypatch):
    """A body that ends waits for every rank; one that raises does not (a peer may never come),
    and its frames are cleared first, so the model a failed run held is freed before cleanup."""
    import weakref

    calls = []
    monkeypatch.setattr(D, "cleanup", lambda *, synchronise: calls.append((synchronise, held())))
    held = lambda: None  # noqa: E731 - replaced below by a weak reference to the failed run's "model"

    with D.torn_down_on_exit():
        pass

    def failing_run():
        nonlocal held
        model = torch.nn.Linear(2, 2)
        held = weakref.ref(model)
        raise RuntimeError("a rank failed")

    with pytest.raises(RuntimeError, match="a rank failed"):
        with D.torn_down_on_exit():
            failing_run()
    assert calls[0] == (True, None)
    assert calls[1] == (False, None), "cleanup ran while the failed run's frames still held its model"


def test_init_distributed_unlaunched(single_process_group):
    info = single_process_group
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert info.device == torch.device("cpu") and info.is_main
    assert D.is_main_process() and D.get_rank() == 0


def test_shard_model_needs_a_process_group(tiny_model):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    with pytest.raises(RuntimeError, match="init_distributed"):
        D.shard_model(tiny_model)


def test_helpers_are_noops_on_a_plain_model(tiny_model, tiny_checkpoint, tmp_path):
    """Without FSDP: gathered_params does nothing; the state dict has
    from_pretrained's names; export writes a loadable checkpoint (replacing an old one)."""
    from models.loading import load_generation_config, load_model, load_processor

    assert not D.is_sharded(tiny_model)
    with D.gathered_params(tiny_model) as m:
        assert m is tiny_model
    state = D.full_state_dict(tiny_model)
    assert set(state) == set(tiny_model.state_dict())

    out = tmp_path / "export"
    processor, generation_config = load_processor(tiny_checkpoint), load_generation_config(tiny_checkpoint)
    for _ in range(2):  # the second export replaces the first
        D.export_checkpoint(tiny_model, processor, generation_config, out, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary leftovers
    reloaded = load_model(out, dtype=torch.bfloat16)
    for name, p in reloaded.state_dict().items():
        assert torch.equal(p, state[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@both_families
def test_single_process_sharding(single_process_group, tiny_checkpoint, tmp_path):
    """World size 1 runs the same FSDP2 code: same log-probs and gradients as the plain model,
    with activation checkpointing; gathered_params and export work."""
    from models import policy
    from models.loading import load_generation_config, load_model, load_processor

    processor = load_processor(tiny_checkpoint)
    plain = load_model(tiny_checkpoint, dtype=torch.float32)
    sharded = D.shard_model(load_model(tiny_checkpoint, dtype=torch.float32), activation_checkpointing=True)
    assert D.is_sharded(sharded)

    messages = [{"role": "user", "content": [{"type": "audio", "audio_url": "a.wav"},
                                              {"type": "text", "text": "What is the sound?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    wave = torch.linspace(-0.5, 0.5, 24000).numpy()
    inputs = processor(text=[text], audio=[wave], sampling_rate=16000, return_tensors="pt")
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
    ids = torch.arange(10, 16)[None, :]

    def loss_and_grads(model):
        embeds = policy.prompt_embeddings(model, **policy.embedding_inputs(batch))
        logp = policy.completion_logprobs(model, embeds, batch["attention_mask"], ids)
        logp.sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace("_checkpoint_wrapped_module.", "")] = g
        return logp.detach(), grads

    logp_plain, grads_plain = loss_and_grads(plain)
    logp_sharded, grads_sharded = loss_and_grads(sharded)
    torch.testing.assert_close(logp_sharded, logp_plain, atol=1e-6, rtol=0)
    assert grads_plain.keys() == grads_sharded.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_sharded[name], grads_plain[name], atol=GRAD_ATOL, rtol=1e-4)

    # the root's own forward (Hugging Face's, e.g. for model.generate) still works after the
    # policy ran submodules directly
    with torch.no_grad():
        torch.testing.assert_close(sharded(**inputs).logits, plain(**inputs).logits, atol=1e-5, rtol=0)

    with torch.no_grad(), D.gathered_params(sharded):
        embeds = policy.prompt_embeddings(sharded, **policy.embedding_inputs(batch))
        generated = policy.generate(sharded, embeds, batch["attention_mask"], max_new_tokens=4,
                                    end_token_ids=[0], pad_token_id=0, suppress_token_ids=[], greedy=True)
    assert generated.shape == (1, 4)

    out = D.export_checkpoint(sharded, processor, load_generation_config(tiny_checkpoint), tmp_path / "ckpt")
    reloaded = load_model(out, dtype=torch.float32)
    for name, p in plain.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name


def test_shard_model_refuses_tied_embeddings(single_process_group, tiny_model):
    tiny_model.lm_head.weight = tiny_model.get_input_embeddings().weight
    with pytest.raises(NotImplementedError, match="tied"):
        D.shard_model(tiny_model)


def test_failed_export_leaves_nothing_behind(tiny_model, tiny_checkpoint, tmp_path):
    """A failure while writing raises and leaves neither out_dir nor a temporary directory."""
    from models.loading import load_generation_config

    with pytest.raises(Exception):
        D.export_checkpoint(tiny_model, None, load_generation_config(tiny_checkpoint), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_micro_batch_widths_are_the_widest_of_any_rank(monkeypatch):
    """agreed_widths: each micro-batch's last loss token over every rank (another rank is
    simulated by the all-reduce), not this rank's own: its own would give another chunk count."""
    import grpo.step as step

    mask = torch.zeros(4, 10, dtype=torch.bool)  # two micro-batches of 2 rows
    mask[0, :3] = True  # micro-batch 0 ends at column 3 here
    # micro-batch 1 has no loss token here
    assert step.agreed_widths(mask, [(0, 2), (2, 4)], torch.device("cpu")) == [3, 1]  # one process
    other_rank = torch.tensor([7, 2])
    monkeypatch.setattr(step, "all_reduce", lambda t, device, op: torch.maximum(t, other_rank))
    assert step.agreed_widths(mask, [(0, 2), (2, 4)], torch.device("cpu")) == [7, 2]


def test_warm_up_targets_take_the_shape_every_rank_agrees_on(tiny_processor):
    """sft_targets with a larger agreed (K, T): rows and columns padded, the mask unchanged
    where this rank's targets are, nothing added to it."""
    from grpo.sft import sft_targets

    answers = [["cat", "dog"], ["bird"]]
    ids, mask, K = sft_targets(tiny_processor.tokenizer, answers, 2, end_id=1, pad_id=0)
    big_ids, big_mask, big_K = sft_targets(tiny_processor.tokenizer, answers, 2, end_id=1, pad_id=0,
                                           agree=lambda shape: (shape[0] + 1, shape[1] + 3))
    assert (K, big_K) == (2, 3)
    assert big_ids.shape == (2 * 3, ids.shape[1] + 3)
    assert int(big_mask.sum()) == int(mask.sum())
    for b in range(2):  # question b's real rows: the same tokens, the same mask
        for k in range(K):
            assert torch.equal(big_ids[b * 3 + k, :ids.shape[1]], ids[b * K + k])
            assert torch.equal(big_mask[b * 3 + k, :ids.shape[1]], mask[b * K + k])
        assert not big_mask[b * 3 + 2].any()


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where torch sees no GPU (a driver too old for the build, or none), launched
    as one of two local processes; no process group exists."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return monkeypatch


def test_no_silent_cpu_fallback_for_several_local_processes(no_cuda):
    """torchrun with 2 local processes and no CUDA: one line naming the build's CUDA, the driver
    it needs and the wheels for older drivers, not a run on the CPU."""
    with pytest.raises(RuntimeError) as err:
        D.init_distributed()
    message = str(err.value)
    assert "\n" not in message and not dist.is_initialized()
    assert "2 processes" in message and "CUDA 13.0" in message and "driver >= 580" in message
    assert "download.pytorch.org/whl/cu126" in message and "distribution.device=cpu" in message
    no_cuda.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(RuntimeError, match="CUDA 12.4, which needs an NVIDIA driver >= 525"):
        D.init_distributed(device="auto")
    no_cuda.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        D.init_distributed()


def test_gpus_asked_for_without_cuda_is_refused_even_for_one_process(no_cuda):
    no_cuda.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match=r"GPUs were asked for \(device cuda\).*driver >= 580"):
        D.init_distributed(device="cuda")


@pytest.mark.parametrize("ask", ["device", "hidden_gpus"])
def test_the_cpu_when_asked_for(no_cuda, ask):
    """device="cpu", or every GPU hidden: the CPU (here a one-process group; LOCAL_WORLD_SIZE
    still says 2, which alone would be refused)."""
    if ask == "hidden_gpus":
        no_cuda.setenv("CUDA_VISIBLE_DEVICES", "")
    info = D.init_distributed(device="cpu" if ask == "device" else None)
    try:
        assert info.device == torch.device("cpu")
    finally:
        D.cleanup()


@pytest.mark.slow
@both_families
def test_static_decoder_under_sharding_matches_the_dynamic_one_in_lockstep(two_ranks):
    """(f) Sharded, sampled with row seeds, rows ending at different steps on the two ranks: the
    static decoder gives the dynamic one's tokens and log-probs (within 1e-5) on each rank, and
    the unsharded model's; both ranks run the same number of decoder forwards."""
    ranks = result(two_ranks, "static_decoding")["ranks"]
    for r in ranks:
        assert r["same_tokens"] and r["same_as_unsharded"], r
        assert r["logp_max_abs"] < 1e-5, r
        assert r["forwards"][0] == r["forwards"][1], r  # the same steps as the dynamic loop
    assert ranks[0]["forwards"] == ranks[1]["forwards"]  # lockstep
    assert ranks[0]["width"] == ranks[1]["width"]
    assert any(r["ended_rows"] for r in ranks)


@pytest.mark.slow
@both_families
def test_meta_device_loading_gives_the_same_sharded_model_bit_for_bit(two_ranks):
    """Built on the meta device and sharded, each rank reading only its own rows from the
    safetensors file: every rank's local shards, buffers (rotary tables recomputed) and
    trainable flags, and the gathered state dict, equal loading the whole model and sharding
    it, for the policy, the frozen reference and the checkpoint-wrapped policy; no fallback."""
    r = result(two_ranks, "meta_load")
    assert r["fallbacks"] == []
    for variant in ("policy", "reference", "checkpointing"):
        v = r[variant]
        assert v["same_keys"] and v["full_unequal"] == [] and v["n_full"] > 50, (variant, v)
        assert v["training"][0] == v["training"][1], (variant, v)
        for rank in v["ranks"]:
            assert rank["local_unequal"] == [] and rank["n_local"] > 50, (variant, rank)
            assert rank["buffers_unequal"] == [] and rank["n_buffers"] >= 2, (variant, rank)
            assert not rank["meta_left"], (variant, rank)
