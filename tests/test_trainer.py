"""train.py end to end, as a user runs it: config errors, one run's outputs, 1 vs 2 processes,
stop-and-resume, the SFT baseline, and the proof that GRPO learns (with its controls).

Every run is a real `python train.py` (or `torchrun ... train.py`) subprocess on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------- helpers


def _env(threads: int | None = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, even on a GPU machine
    return env


def _command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / "train.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(REPO / "train.py"), *args]


def train(args: list[str], *, nproc: int = 1, timeout: int = 900, check: bool = True, threads: int | None = 1):
    """Run train.py to the end; returns the CompletedProcess (fails the test on error when `check`)."""
    proc = subprocess.run(_command(args, nproc), cwd=REPO, env=_env(threads), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"train.py exited with {proc.returncode}:\n{proc.stderr[-5000:]}")
    return proc


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def weights(export_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    assert tensors, f"no safetensors in {export_dir}"
    return tensors


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def relative_weight_difference(a: Path, b: Path, start: Path) -> float:
    """||w_a - w_b|| / ||w_a - w_start||: how far apart two runs ended, relative to how far they travelled."""
    wa, wb, w0 = weights(a), weights(b), weights(start)
    apart = sum(((wa[k].double() - wb[k].double()) ** 2).sum() for k in wa) ** 0.5
    travelled = sum(((wa[k].double() - w0[k].double()) ** 2).sum() for k in wa) ** 0.5
    return float(apart / travelled)


def final_export(run_dir: Path) -> Path:
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    return run_dir / "checkpoints" / f"step_{steps[-1]}" / "hf"


# ----------------------------------------------------------------------------- a small world


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory):
    """A tiny model and a small synthetic question set, shared by the short runs."""
    from data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("trainer")
    train_path = generate_synthetic(root / "data", n=64, seed=0, tasks=["pitch", "tone_or_noise"], split="train")
    eval_path = generate_synthetic(root / "data", n=8, seed=1, tasks=["pitch", "tone_or_noise"], split="eval")
    return {"root": root, "model": tiny_checkpoint, "train": train_path, "eval": eval_path}


WARMUP, GRPO_STEPS = 30, 4
SAVE_AT = WARMUP + 2  # a checkpoint after the warm-up


def short_run(world, out: Path, *extra: str) -> list[str]:
    """A short GRPO run: a label-free format warm-up, then a few GRPO steps with every moving
    part on (reference model and KL, mu = 2 so the ratio and clipping act, evaluation)."""
    return [
        "--config", str(TINY),
        f"run.output_dir={out}", f"run.steps={GRPO_STEPS}",
        f"model.path={world['model']}", "model.build_tiny=false",
        f"data.train_path={world['train']}", f"data.eval_path={world['eval']}", "data.synthetic_generate=false",
        "data.eval_every=0", "data.eval_samples=0",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.generation_batch_prompts=2",
        "rollout.max_new_tokens=8",
        f"algorithm.format_warmup_steps={WARMUP}", "algorithm.format_warmup_lr=5e-3", "algorithm.mu=2",
        "algorithm.micro_batch_prompts=1", "optimizer.lr=3e-3",
        # the mechanics under test, not the demo's learning settings (dynamic sampling has its own test)
        "algorithm.beta=0.04", "algorithm.dynamic_sampling=false",
        "logging.sample_every=0", "logging.progress_bar=false",
        *extra,
    ]


def in_process_trainer(world, out: Path, *extra: str):
    """A Trainer in this process (no subprocess) on the short run's settings, GRPO from step 0."""
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, short_run(world, out, "algorithm.format_warmup_steps=0", "logging.tensorboard=false",
                                      "checkpointing.every=0", *extra)[2:])
    return Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


@pytest.mark.parametrize("mu", [1, 2])
def test_the_sampler_trainer_gap_is_logged_near_zero_in_fp32_and_shows_a_wrong_temperature(world, tmp_path, mu):
    """train/sampler_logprob_diff/{mean,max}: the sampler's log-probs of its tokens against the
    old-policy pass (mu = 2) or the first update pass (mu = 1). fp32 on the CPU: rounding only.
    A sampler at another temperature than the loss's shows as a gap far above rounding."""
    trainer = in_process_trainer(world, tmp_path / "run", f"algorithm.mu={mu}", "rollout.temperature=0.8")
    try:
        metrics = trainer.grpo_step()
        assert 0 <= metrics["train/sampler_logprob_diff/mean"] <= metrics["train/sampler_logprob_diff/max"] < 1e-5
        trainer.sampling.temperature = 1.2  # the rollout now samples (and scores) at 1.2, the loss still at 0.8
        metrics = trainer.grpo_step()
        assert metrics["train/sampler_logprob_diff/mean"] > 1e-2
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- configuration errors


def test_unknown_key_names_the_key_the_file_and_the_fix(tmp_path):
    proc = train(["--config", str(TINY), "rollout.group_sise=4"], check=False, timeout=120)
    assert proc.returncode == 2
    assert "group_sise" in proc.stderr and "group_size" in proc.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 3\nalgorithm:\n  betta: 0.1\n")
    proc = train(["--config", str(bad)], check=False, timeout=120)
    assert proc.returncode == 2
    assert "betta" in proc.stderr and str(bad) in proc.stderr and "beta" in proc.stderr


def test_wrong_type_and_bad_choice_are_config_errors(tmp_path):
    proc = train(["--config", str(TINY), "rollout.group_size=many"], check=False, timeout=120)
    assert proc.returncode == 2 and "rollout.group_size" in proc.stderr
    proc = train(["--config", str(TINY), "algorithm.loss_type=ppo"], check=False, timeout=120)
    assert proc.returncode == 2 and "algorithm.loss_type" in proc.stderr and "dr_grpo" in proc.stderr


def test_missing_checkpoint_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = train(["--config", str(TINY), f"model.path={missing}", "model.build_tiny=false",
                  f"run.output_dir={tmp_path / 'run'}", f"data.train_path={tmp_path / 'd' / 'train.jsonl'}",
                  f"data.eval_path={tmp_path / 'd' / 'eval.jsonl'}", "data.synthetic_train_size=8",
                  "data.synthetic_eval_size=2"], check=False, timeout=300)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr


# ----------------------------------------------------------------------------- in-process pieces


def test_learning_rate_schedules():
    from grpo.config import OptimizerConfig
    from grpo.step import lr_at

    linear = OptimizerConfig(lr=1.0, warmup_steps=2, schedule="linear")
    assert [lr_at(u, 6, linear) for u in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cosine = OptimizerConfig(lr=1.0, warmup_steps=2, schedule="cosine")
    assert lr_at(4, 6, cosine) == pytest.approx(0.5) and lr_at(2, 6, cosine) == pytest.approx(1.0)
    assert [lr_at(u, 6, OptimizerConfig(lr=0.1, schedule="constant")) for u in range(6)] == [0.1] * 6


def test_non_finite_updates_are_skipped_counted_and_finally_stop_the_run(world, tmp_path):
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, short_run(world, tmp_path / "nan")[2:] + [
        "checkpointing.save_on_signal=false", "logging.tensorboard=false", "optimizer.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]

    from grpo.step import optimizer_step

    counters = trainer.counters

    def poisoned_step():
        for p in params:
            p.grad = torch.ones_like(p)
        params[0].grad[0] = float("nan")
        return optimizer_step(trainer.context(), counters, 1.0)

    assert math.isnan(poisoned_step())
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a non-finite update must not touch the weights"
    assert (counters.nonfinite_in_a_row, counters.nonfinite_total, counters.update) == (1, 1, 0)
    for p in params:  # a finite update resets the run of failures
        p.grad = torch.ones_like(p)
    optimizer_step(trainer.context(), counters, 1.0)
    assert (counters.nonfinite_in_a_row, counters.nonfinite_total, counters.update) == (0, 1, 1)
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
    poisoned_step()
    with pytest.raises(FloatingPointError, match="max_nonfinite_steps=2"):
        poisoned_step()


def test_the_label_free_warm_up_never_sees_the_answers(world, tmp_path):
    """The format warm-up trains on every choice of each question with the same weight, so
    its updates cannot depend on which choice is right: the same steps on a copy of the data
    with every answer moved to another choice leave bitwise the same weights."""
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    flipped = tmp_path / "flipped-data" / "train.jsonl"
    flipped.parent.mkdir()
    records = [json.loads(line) for line in Path(world["train"]).read_text().splitlines()]
    right = [r["multi_choice"][r["answer"]] for r in records]
    for r in records:  # the audio paths stay those of the original folder
        r["audio_path"] = str(Path(world["train"]).parent / r["audio_path"])
        r["answer"] = (r["answer"] + 1) % len(r["multi_choice"])
    flipped.write_text("".join(json.dumps(r) + "\n" for r in records))

    weights = []
    for name, train_path in (("right", world["train"]), ("flipped", flipped)):
        cfg = load_config(TINY, short_run(world, tmp_path / name)[2:] + [
            f"data.train_path={train_path}", "checkpointing.save_on_signal=false", "logging.tensorboard=false"])
        trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        for _ in range(3):
            trainer.sft_step(label_free=True, lr=cfg.algorithm.format_warmup_lr)
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        if hasattr(trainer, "close"):
            trainer.close()
    assert all(s.answer != a for s, a in zip(trainer.train_samples, right)), "every answer is moved"
    changed = [n for n in weights[0] if not torch.equal(weights[0][n], weights[1][n])]
    assert not changed, changed
    from grpo.setup import load_policy_model

    start = {n: p for n, p in load_policy_model(cfg, trainer.device, fsdp=False, trainable=False).named_parameters()}
    assert any(not torch.equal(weights[0][n], start[n]) for n in start), "the warm-up steps must train"


def test_the_logged_loss_and_gradient_norm_are_means_over_the_mu_passes(world, tmp_path):
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, short_run(world, tmp_path / "mu")[2:] + [
        "checkpointing.save_on_signal=false", "logging.tensorboard=false", "algorithm.mu=3", "optimizer.lr=0.05"])
    from grpo.metrics import update_metrics
    from grpo.step import policy_update, rollout

    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    traj, _ = rollout(trainer.context(), step=0)
    traj = traj._replace(advantages=torch.randn(traj.advantages.shape, generator=torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    seen = policy_update(trainer.context(), trainer.counters, traj)
    metrics = update_metrics(seen, 0.05, trainer.device)
    moved = any(not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before))
    trainer.close()
    assert moved and trainer.counters.update == 3, "three optimizer steps"
    assert len(seen.losses) == 3 and len(set(seen.losses)) == 3, "each pass sees the updated policy"
    assert len(set(seen.norms)) == 3
    assert metrics["train/loss"] == pytest.approx(sum(seen.losses) / 3, rel=1e-12)
    assert metrics["train/grad_norm"] == pytest.approx(sum(seen.norms) / 3, rel=1e-12)


VARIANT_OVERRIDES = {  # the GRPO family through the trainer (grpo/algorithm.py, "Variants")
    "cispo": ["algorithm.policy_loss_type=cispo", "algorithm.loss_type=token_mean"],
    "gmpo": ["algorithm.policy_loss_type=gmpo", "algorithm.eps_low=0.4", "algorithm.eps_high=0.4"],
    "sapo+kl_iw": ["algorithm.policy_loss_type=sapo", "algorithm.kl_importance_weighted=true"],
    "dual_clip+entropy": ["algorithm.clip_ratio_c=3", "algorithm.top_entropy_fraction=0.3",
                          "algorithm.loss_type=dr_grpo"],
    "luspo": ["algorithm.loss_type=luspo", "algorithm.importance_level=sequence"],
    "vespo": ["algorithm.policy_loss_type=vespo", "algorithm.loss_type=token_mean", "algorithm.vespo_k_pos=1.5"],
}


def _rolled_out_with_uneven_lengths(world, run_dir, overrides):
    """A one-process Trainer on the tiny config and one rollout of step 0, with a loss mask of
    random unequal lengths (an untrained model rarely ends early). Returns (trainer, trajectory,
    mask [N, T], the generator that drew the lengths, for the caller's further draws)."""
    from grpo.config import load_config
    from grpo.step import rollout
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, short_run(world, run_dir)[2:] + [
        "checkpointing.save_on_signal=false", "logging.tensorboard=false", "optimizer.max_grad_norm=0",
        "rollout.max_new_tokens=6", *overrides])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    traj, _ = rollout(trainer.context(), step=0)
    g = torch.Generator().manual_seed(0)
    n, T = traj.mask.shape
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    return trainer, traj, torch.arange(T)[None, :] < lengths[:, None], g


@pytest.mark.parametrize("overrides", [[f"algorithm.loss_type={t}"] for t in ("grpo", "token_mean", "dr_grpo")]
                         + list(VARIANT_OVERRIDES.values()),
                         ids=["grpo", "token_mean", "dr_grpo", *VARIANT_OVERRIDES])
def test_micro_batching_inside_the_trainer_does_not_change_the_gradient(world, tmp_path, overrides):
    """The invariance of the GRPO core, through the step's policy_update: 4 prompts in 1, 2 or 4
    micro-batches accumulate the same gradient (completions of unequal lengths)."""
    from dataclasses import replace

    from grpo.step import policy_update

    trainer, traj, mask, g = _rolled_out_with_uneven_lengths(world, tmp_path / "mb", ["algorithm.mu=1", *overrides])
    cfg = trainer.cfg
    n = traj.mask.shape[0]
    # an untrained model gets no reward: non-zero advantages by hand
    traj = traj._replace(mask=mask, total_tokens=int(mask.sum()), advantages=torch.randn(n, generator=g))

    class Capture(torch.optim.SGD):  # an optimizer that keeps the gradient it is given and moves nothing
        def step(self, closure=None):
            self.captured = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    grads = {}
    for micro in (4, 2, 1):
        optimizer = Capture(trainer.model.parameters(), lr=0.0)
        ctx = replace(trainer.context(), optimizer=optimizer,
                      settings=replace(trainer.step_settings, micro_batch_prompts=micro))
        policy_update(ctx, trainer.counters, traj)
        grads[micro] = optimizer.captured
    assert grads[4] and any(g.abs().max() > 0 for g in grads[4].values())
    if cfg.algorithm.top_entropy_fraction < 1:  # a real selection: some loss tokens out, some in
        kept = traj.token_weights.sum() / (traj.token_weights.numel())
        assert 0 < kept < 1
    for micro in (2, 1):
        for name, g in grads[4].items():
            torch.testing.assert_close(grads[micro][name], g, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_rollout_adds_the_overlong_punishment_and_normalises_each_reward(world, tmp_path):
    """overlong_buffer adds DAPO's length reward per completion (logged as "overlong"); with
    normalize_each and leave_one_out the advantages are those of multi_reward_advantages."""
    from grpo.algorithm import AdvantageSpec, multi_reward_advantages
    from grpo.config import load_config
    from grpo.rewards import soft_overlong_punishment
    from grpo.trainer import Trainer
    from models.distributed import DistInfo

    cfg = load_config(TINY, short_run(world, tmp_path / "ol")[2:] + [
        "checkpointing.save_on_signal=false", "logging.tensorboard=false", "algorithm.mu=1",
        "rollout.max_new_tokens=6", "algorithm.overlong_buffer=4", "algorithm.overlong_penalty=0.5",
        "algorithm.reward_normalization=normalize_each", "algorithm.advantage_baseline=leave_one_out"])
    from grpo.metrics import rollout_metrics
    from grpo.step import rollout

    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    traj, record = rollout(trainer.context(), step=0)
    metrics = rollout_metrics(record, trainer.tasks, 4, trainer.device)
    seen = {"round": record.rounds[0]}  # no dynamic sampling: the one round is the batch
    lengths = traj.mask.sum(dim=1).tolist()
    expected = [soft_overlong_punishment(n, 6, 4) for n in lengths]
    assert seen["round"].per_reward["overlong"] == expected
    assert metrics["train/rewards/overlong/mean"] == pytest.approx(sum(expected) / len(expected))
    names = list(seen["round"].per_reward)
    per_reward = torch.tensor([seen["round"].per_reward[k] for k in names]).T.float()
    weights = torch.tensor([0.5 if k == "overlong" else cfg.algorithm.rewards[k] for k in names])
    spec = AdvantageSpec(normalization="normalize_each", baseline="leave_one_out")
    torch.testing.assert_close(traj.advantages, multi_reward_advantages(per_reward, weights, 4, spec))
    totals = seen["round"].rewards.reshape(-1)
    assert totals.tolist() == pytest.approx([sum(weights[k].item() * per_reward[i, k].item() for k in range(len(names)))
                                             for i in range(len(totals))])


@pytest.mark.parametrize("mode", ["is_token", "is_sequence", "rs_geometric"])
def test_rollout_correction_scales_the_gradient_by_the_sampler_weight(world, tmp_path, mode):
    """With the sampler's log-probs off the trainer's (log pi_sampler = log pi_old - delta),
    algorithm.rollout_is_level gives the gradient of the loss whose tokens carry the weight
    min(pi_old / pi_sampler, cap) (at its level), and rollout_rs_level that of the loss whose
    tokens outside the band are dropped: the same gradient as the trajectory with those
    weights given as token weights, and not the uncorrected one. The weights' statistics are logged."""
    from dataclasses import replace

    from grpo.config import correction_spec
    from grpo.metrics import update_metrics
    from grpo.step import policy_update

    trainer, traj, mask, g = _rolled_out_with_uneven_lengths(world, tmp_path / "rc",
                                                             ["algorithm.mu=2", "algorithm.micro_batch_prompts=2"])
    cfg = trainer.cfg
    n, T = traj.mask.shape
    delta = 0.4 * torch.randn(n, T, generator=g)  # log pi_old - log pi_sampler
    traj = traj._replace(mask=mask, total_tokens=int(mask.sum()), advantages=torch.randn(n, generator=g),
                         sampler_logp=traj.old_logp - delta)
    class Capture(torch.optim.SGD):  # an optimizer that keeps the gradient it is given and moves nothing
        def step(self, closure=None):
            self.captured = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    def gradient(trajectory, **keys):
        algorithm = replace(cfg.algorithm, **{"rollout_is_level": "none", "rollout_rs_level": "none", **keys})
        optimizer = Capture(trainer.model.parameters(), lr=0.0)
        correction = correction_spec(replace(cfg, algorithm=algorithm))
        ctx = replace(trainer.context(), optimizer=optimizer, correction=correction)
        seen = policy_update(ctx, trainer.counters, trajectory)
        return optimizer.captured, update_metrics(seen, 0.0, trainer.device)

    if mode == "rs_geometric":
        ratio = torch.exp((delta * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).expand(n, T)
        expected_weights = ((ratio >= 0.8) & (ratio <= 1.2) & mask).float()
        corrected, metrics = gradient(traj, rollout_rs_level="geometric", rollout_rs_low=0.8, rollout_rs_high=1.2)
        assert metrics["train/rollout_rs/rejected_frac"] == pytest.approx(
            1 - expected_weights.sum().item() / mask.sum().item(), rel=1e-5)
    else:
        level = mode.split("_")[1]
        log_w = delta * mask if level == "token" else (delta * mask).sum(1, keepdim=True).expand(n, T)
        expected_weights = torch.exp(log_w).clamp(max=1.5) * mask
        corrected, metrics = gradient(traj, rollout_is_level=level, rollout_is_cap=1.5)
        assert metrics["train/rollout_is/mean"] == pytest.approx(torch.exp(log_w)[mask].mean().item(), rel=1e-5)
        assert 0 < metrics["train/rollout_is/truncated_frac"] < 1
    assert 0 < expected_weights[mask].ne(1).float().mean()  # the weights are not all 1: the test can see them
    by_hand, _ = gradient(traj._replace(token_weights=expected_weights))
    plain, _ = gradient(traj)
    assert corrected and any(v.abs().max() > 0 for v in corrected.values())
    for name, value in corrected.items():
        torch.testing.assert_close(value, by_hand[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert any(not torch.allclose(value, plain[name], atol=1e-6, rtol=1e-4) for name, value in corrected.items())


@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_follows_the_policy_every_n_grpo_steps(world, tmp_path, lora, monkeypatch):
    """ref_sync_every: after GRPO steps 2 and 4 (not 1, 3) the reference moves. Without LoRA it
    becomes alpha pi_theta + (1 - alpha) pi_ref; with LoRA the adapters are merged, so the
    reference ("adapters off") computes what the policy computed."""
    from grpo.config import load_config
    from grpo.trainer import Trainer
    from models.distributed import DistInfo
    from models.lora import adapters_disabled

    extra = ["lora.enabled=true", "lora.rank=4"] if lora else ["algorithm.ref_sync_alpha=0.5"]
    cfg = load_config(TINY, short_run(world, tmp_path / "sync")[2:] + [
        "checkpointing.save_on_signal=false", "logging.tensorboard=false", "algorithm.mu=1",
        "algorithm.format_warmup_steps=0", "run.steps=4", "algorithm.ref_sync_every=2",
        "rollout.max_new_tokens=4", "checkpointing.every=0", *extra])
    trainer = Trainer(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    synced, follow = [], trainer.reference.follow

    def sync():
        follow(trainer.optimizer)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(0))

    def logits(adapters: bool) -> torch.Tensor:
        training = trainer.model.training
        trainer.model.eval()  # no dropout: the same input must give the same output
        try:
            with torch.no_grad():
                if adapters:
                    return trainer.model(input_ids=ids).logits
                with adapters_disabled(trainer.model):
                    return trainer.model(input_ids=ids).logits
        finally:
            trainer.model.train(training)

    def record():
        if lora:  # the reference ("adapters off") must become what the policy computes now
            reference_before, policy = logits(False), logits(True)
            sync()
            torch.testing.assert_close(logits(False), policy, atol=1e-5, rtol=1e-5)
            if not synced:  # the hand-moved adapters (later ones may not have learned anything)
                assert not torch.allclose(reference_before, policy, atol=1e-5)
        else:
            ref_before = [p.detach().clone() for p in trainer.reference.copy.parameters()]
            sync()
            for r, b, p in zip(trainer.reference.copy.parameters(), ref_before, trainer.model.parameters()):
                torch.testing.assert_close(r, 0.5 * p.detach() + 0.5 * b)
            if not synced:
                assert any(not torch.equal(r, b) for r, b in zip(trainer.reference.copy.parameters(), ref_before))
        synced.append(trainer.step)

    # an untrained model may earn no reward in 4 steps (zero advantages, no update): set the
    # policy and its reference apart by hand so that the sync has something to do
    with torch.no_grad():
        moved = [p for n, p in trainer.model.named_parameters() if "lora_B" in n] if lora else \
            list(trainer.reference.copy.parameters())
        for p in moved:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(trainer.reference, "follow", lambda optimizer: record())
    trainer.train()
    trainer.close()
    assert synced == [2, 4]


# ----------------------------------------------------------------------------- one run


@pytest.fixture(scope="module")
def one_process_run(world):
    out = world["root"] / "one"
    train(short_run(world, out, f"checkpointing.every={SAVE_AT}", "checkpointing.keep_last=2"))
    return out


def test_a_run_logs_every_metric_and_writes_a_loadable_export(world, one_process_run):
    rows = history(one_process_run)
    assert [r["step"] for r in rows] == list(range(1, WARMUP + GRPO_STEPS + 1))
    warmup, grpo = rows[:WARMUP], rows[WARMUP:]
    assert all(r["train/phase"] == 0.0 for r in warmup) and all(r["train/phase"] == 1.0 for r in grpo)
    expected = ["train/reward", "train/reward_std", "train/rewards/accuracy/mean", "train/rewards/format/mean",
                "train/kl", "train/clip_ratio/region_mean", "train/ratio_mean", "train/entropy", "train/loss",
                "train/grad_norm", "train/completions/mean_length", "train/completions/clipped_ratio",
                "train/frac_reward_zero_std", "train/sampler_logprob_diff/mean", "train/sampler_logprob_diff/max",
                "timing/rollout", "timing/update", "timing/step",
                "perf/generated_tokens_per_second", "perf/peak_memory_gb"]
    for row in grpo:
        missing = [k for k in expected if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert all(math.isfinite(row[k]) for k in expected)
    # the warm-up taught the format: the loss fell
    assert warmup[-1]["train/loss"] < 0.5 * warmup[0]["train/loss"]
    # mu = 2: the second update sees a ratio different from 1
    assert any(abs(r["train/ratio_mean"] - 1.0) > 1e-6 for r in grpo)
    assert "eval/greedy_accuracy" in rows[-1]
    assert list((one_process_run / "tb").glob("events.out.tfevents.*"))

    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    export = final_export(one_process_run)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(export)
    AutoProcessor.from_pretrained(export)
    trained = weights(export)
    assert torch.equal(model.lm_head.weight.detach(), trained["language_model.lm_head.weight"])  # hub key layout
    assert max_weight_difference(export, world["model"]) > 1e-3  # training moved the weights


def test_dynamic_sampling_resamples_when_groups_carry_no_signal(world, tmp_path):
    """DAPO's dynamic sampling: while a group's G rewards are all equal (zero advantage),
    more rounds are sampled, up to the bound, and the batch keeps informative groups first."""
    out = tmp_path / "dapo"
    train(short_run(world, out, "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2",
                    "algorithm.loss_type=token_mean", "algorithm.eps_high=0.28", "checkpointing.export=false"))
    grpo = [r for r in history(out) if r["train/phase"] == 1.0]
    assert all(1 <= r["train/sampling_rounds"] <= 3 for r in grpo)
    resampled = [r for r in grpo if r["train/sampling_rounds"] > 1]
    assert resampled, "no step needed a second round: the test did not exercise resampling"
    # the kept batch has at least as much signal as the first round had
    for r in resampled:
        kept_zero_std = r["train/reward_std"] == 0
        assert not (kept_zero_std and r["train/frac_reward_zero_std"] < 1.0)


# ----------------------------------------------------------------------------- 1 process == 2 processes


@pytest.fixture(scope="module")
def two_process_run(world):
    out = world["root"] / "two"
    train(short_run(world, out, f"checkpointing.every={SAVE_AT}", "checkpointing.keep_last=2"), nproc=2)
    return out


@pytest.mark.slow
def test_two_processes_train_like_one(world, one_process_run, two_process_run):
    """Same seed, same batch: FSDP on 2 gloo ranks samples the same completions, gets the same
    rewards, and ends at the same weights as one process (up to float summation order)."""
    one, two = history(one_process_run), history(two_process_run)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in ("train/reward", "train/rewards/format/mean", "train/completions/mean_length"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-9), (a["step"], key)
        # the warm-up's losses agree to ~1e-6; a GRPO step logs the mean loss of its two passes
        # (mu = 2), and the second follows an update that fresh AdamW moments make ~lr * sign(g):
        # a near-zero gradient entry whose sign differs by summation order moves by 2 lr, which
        # shows in that pass's ratios and clipping at the 1e-3 level
        rel = 1e-5 if a["train/phase"] == 0.0 else 1e-2
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=rel, abs=1e-5), a["step"]
    # AdamW divides by sqrt(v): summation-order noise in near-zero gradients moves single
    # entries by up to ~lr, so compare the runs' distance with the distance they travelled
    assert relative_weight_difference(final_export(one_process_run), final_export(two_process_run),
                                      world["model"]) < 1e-2


# ----------------------------------------------------------------------------- stop and resume


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(world, one_process_run, tmp_path):
    """SIGTERM mid-run: a checkpoint is written at the end of the step, the exit status says
    the run was terminated (143 = 128 + SIGTERM); --resume continues to exactly the run that
    was never stopped (same rewards, same weights)."""
    out = tmp_path / "stopped"
    args = short_run(world, out, f"checkpointing.every={SAVE_AT}", "checkpointing.keep_last=2")
    proc = subprocess.Popen(_command(args, 1), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # stop it a few steps in
        if (out / "history.jsonl").is_file() and len(history(out)) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    stopped_at = len(history(out))
    assert stopped_at < WARMUP + GRPO_STEPS, "the run finished before the signal: nothing was tested"
    assert (out / "checkpoints" / f"step_{stopped_at}" / "trainer_state.json").is_file()

    train([*args, "--resume"])
    resumed, reference = history(out), history(one_process_run)
    assert [r["step"] for r in resumed] == list(range(1, WARMUP + GRPO_STEPS + 1))
    for a, b in zip(resumed, reference):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-9), a["step"]
    assert max_weight_difference(final_export(out), final_export(one_process_run)) < 1e-6


@pytest.mark.slow
def test_two_process_resume_after_the_warmup_equals_the_uninterrupted_run(world, two_process_run, tmp_path):
    """Resume from the step-SAVE_AT checkpoint (after the warm-up: the reference is the saved snapshot, AdamW has
    GRPO moments, the data stream is mid-epoch) on 2 ranks; ends where the full run ended."""
    out = tmp_path / "resumed"
    checkpoint = two_process_run / "checkpoints" / f"step_{SAVE_AT}"
    assert (checkpoint / "state").is_dir()
    train([*short_run(world, out), "--resume", str(checkpoint)], nproc=2)
    resumed, reference = history(out), history(two_process_run)
    assert [r["step"] for r in resumed] == list(range(SAVE_AT + 1, WARMUP + GRPO_STEPS + 1))
    for a, b in zip(resumed, reference[SAVE_AT:]):
        assert a["train/reward"] == pytest.approx(b["train/reward"], abs=1e-9), a["step"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-8), a["step"]
    assert max_weight_difference(final_export(out), final_export(two_process_run)) < 1e-5


def test_resume_from_an_older_checkpoint_of_the_same_run_rewrites_its_tail(world, one_process_run, tmp_path):
    """As after a crash past the last checkpoint: resuming from step SAVE_AT in the run's own
    directory logs every step exactly once and ends at the same weights."""
    import shutil

    out = tmp_path / "again"
    shutil.copytree(one_process_run, out)
    final = final_export(one_process_run)
    train([*short_run(world, out, f"checkpointing.every={SAVE_AT}", "checkpointing.keep_last=2"),
           "--resume", str(out / "checkpoints" / f"step_{SAVE_AT}")])
    assert [r["step"] for r in history(out)] == list(range(1, WARMUP + GRPO_STEPS + 1))
    assert max_weight_difference(final_export(out), final) < 1e-6


@pytest.mark.slow
def test_resume_across_a_reference_sync_equals_the_uninterrupted_run(world, tmp_path):
    """ref_sync_every=2, alpha 0.5: the checkpoint of GRPO step 2 (step SAVE_AT) is written after
    that step's sync, so the run resumed from it starts GRPO steps 3-4 with the moved reference
    (the KL says which reference it used) and ends at the uninterrupted run's weights. (With
    LoRA the sync is the merge whose resume tests/test_lora.py checks after the warm-up; the
    short LoRA run earns no reward, so its KL stays 0 and could not tell the references apart.)"""
    extra = ["algorithm.ref_sync_alpha=0.5"]
    whole, out = tmp_path / "whole", tmp_path / "resumed"
    args = [*short_run(world, whole), "algorithm.ref_sync_every=2", f"checkpointing.every={SAVE_AT}",
            "checkpointing.keep_last=2", *extra]
    train(args)
    checkpoint = whole / "checkpoints" / f"step_{SAVE_AT}"
    assert (checkpoint / "trainer_state.json").is_file()
    train([*[a.replace(str(whole), str(out)) for a in args], "--resume", str(checkpoint)])
    resumed, reference = history(out), history(whole)
    assert [r["step"] for r in resumed] == list(range(SAVE_AT + 1, WARMUP + GRPO_STEPS + 1))
    for a, b in zip(resumed, reference[SAVE_AT:]):
        for key in ("train/kl", "train/loss", "train/reward"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert reference[SAVE_AT]["train/kl"] > 0  # the policy and the reference differ: the KL tells which reference
    assert max_weight_difference(final_export(out), final_export(whole)) < 1e-6


def test_resume_with_another_number_of_processes_is_refused(world, one_process_run, tmp_path):
    checkpoint = one_process_run / "checkpoints" / f"step_{SAVE_AT}"
    proc = train([*short_run(world, tmp_path / "r"), "--resume", str(checkpoint)], nproc=2, check=False)
    assert proc.returncode != 0
    assert "same number of processes" in proc.stderr


# ----------------------------------------------------------------------------- the SFT baseline


def test_sft_baseline_fits_the_answers(world, tmp_path):
    out = tmp_path / "sft"
    train(short_run(world, out, "algorithm.name=sft", "run.steps=16", "checkpointing.export=false"))
    rows = history(out)
    assert len(rows) == 16  # no warm-up for SFT
    first, last = sum(r["train/loss"] for r in rows[:3]) / 3, sum(r["train/loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * first


# ----------------------------------------------------------------------------- GRPO learns


def learning_run(tmp_root: Path, name: str, *extra: str) -> list[dict]:
    """configs/tiny.yaml as `make train` runs it (its own fresh model and data under tmp, one thread:
    two threads on a shared 2-core machine made each step 5-20x slower, benchmarks/RESULTS.md)."""
    out = tmp_root / name
    train(["--config", str(TINY), f"run.output_dir={out}",
           f"model.path={tmp_root / 'model'}", f"data.train_path={tmp_root / 'data' / 'train.jsonl'}",
           f"data.eval_path={tmp_root / 'data' / 'eval.jsonl'}", "logging.progress_bar=false",
           "checkpointing.export=false", *extra], timeout=1800, threads=1)  # one thread, as `make train`
    return history(out)


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    return tmp_path_factory.mktemp("learning")


def _final_accuracy(rows):
    return [r for r in rows if "eval/greedy_accuracy" in r][-1]["eval/greedy_accuracy"]


def _train_accuracy(rows, last):
    grpo = [r["train/rewards/accuracy/mean"] for r in rows if "train/rewards/accuracy/mean" in r]
    return sum(grpo[-last:]) / last, sum(grpo[:last]) / last


@pytest.mark.slow
def test_grpo_learns_the_synthetic_audio_questions(learning):
    """The `make train` recipe: after a label-free warm-up (accuracy at chance), GRPO alone
    takes held-out greedy accuracy on pitch and on tone-or-noise questions to >= 0.95 each
    (benchmarks/results/seeds-cpu.md: the same on every seed 0..9)."""
    rows = learning_run(learning, "grpo")
    warm = [r for r in rows if r["train/phase"] == 0.0 and "eval/greedy_accuracy" in r]
    assert warm and warm[-1]["eval/greedy_accuracy"] <= 0.65, "the warm-up alone must not solve the task"
    for task in ("pitch", "tone_or_noise"):  # no task is solved by the warm-up alone either
        assert warm[-1][f"eval/greedy_accuracy/{task}"] <= 0.7, (task, warm[-1])
    late, early = _train_accuracy(rows, 25)
    assert late > early + 0.3, (early, late)
    final = [r for r in rows if "eval/greedy_accuracy" in r][-1]
    assert final["eval/greedy_accuracy"] >= 0.95, final
    for task in ("pitch", "tone_or_noise"):
        assert final[f"eval/greedy_accuracy/{task}"] >= 0.95, (task, final)


@pytest.mark.slow
def test_control_flipped_advantages_do_not_learn(learning):
    """Same run, advantages negated: the policy is pushed away from the reward."""
    rows = learning_run(learning, "flipped", "algorithm.flip_advantage_sign=true")
    assert _final_accuracy(rows) <= 0.6
    late, _ = _train_accuracy(rows, 25)
    assert late <= 0.6


@pytest.mark.slow
def test_control_silent_audio_stays_at_chance(learning):
    """Same run with every clip replaced by silence: the answers cannot be learned, so the
    gain of the real run comes from listening, not from the question text."""
    rows = learning_run(learning, "silent", "data.silence_audio=true")
    assert _final_accuracy(rows) <= 0.65
    late, _ = _train_accuracy(rows, 25)
    assert late <= 0.65


def test_a_qwen2_5_omni_thinker_trains_and_exports_a_plain_checkpoint(world, tmp_path):
    """The trainer on the tiny Qwen2.5-Omni thinker (chosen from its config.json): a short
    warm-up and GRPO steps with the reference, KL and mu = 2, then an export that plain
    transformers loads as the thinker, in the hub's key layout, with the weights moved."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from data.synthetic import synthetic_corpus
    from models.tiny import build_tiny_checkpoint

    omni = build_tiny_checkpoint(tmp_path / "omni", family="qwen2_5_omni", seed=0, corpus=synthetic_corpus())
    out = tmp_path / "run"
    train(short_run({**world, "model": omni}, out, "logging.tensorboard=false"))
    rows = history(out)
    grpo = [r for r in rows if r["train/phase"] == 1.0]
    assert len(grpo) == GRPO_STEPS and all(math.isfinite(r["train/kl"]) and math.isfinite(r["train/loss"]) for r in grpo)
    assert any(abs(r["train/ratio_mean"] - 1.0) > 1e-6 for r in grpo)  # mu = 2: the policy moved
    export = final_export(out)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(export)
    trained = weights(export)
    assert torch.equal(model.lm_head.weight.detach(), trained["lm_head.weight"])
    assert "model.layers.0.self_attn.q_proj.weight" in trained  # the thinker's hub layout
    assert max_weight_difference(export, omni) > 1e-3
