"""Smoke test of benchmarks/bench_step.py on the tiny model: both modes run, and they agree.

The cross-check is the point: the naive mode (plain model(**inputs) on G-times repeated inputs,
full-sequence fp32 log_softmax) and ours (each clip encoded once, logits only at completion
positions) must give the same log-probs, loss and gradients on the same completions, or the
speed-up would be comparing two different computations.
"""

import json

import pytest
import torch

from benchmarks import bench_step

ROOT = bench_step.ROOT
FAST = ["--threads", "1", "--repeats", "1", "--warmup", "0"]  # 1 thread: no OpenMP waits on a busy machine


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """--threads sets torch's thread count for the whole process: put it back for other test files."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    bench_step.main(["--model", "tiny", "--mode", "both", "--device", "cpu", "--prompts", "1", "--group-size", "2",
                     "--new-tokens", "4", *FAST, "--json", str(out)])
    return json.loads(out.read_text())


def _check_mode(mode, phases):
    assert list(mode["phases"]) == phases
    for name, phase in mode["phases"].items():
        assert phase["seconds"] > 0 and phase["peak_memory_gb"] > 0
        assert (phase["tokens_per_s"] is None) == (name == "optimizer")
    step = mode["step"]
    assert step["seconds"] == pytest.approx(sum(p["seconds"] for p in mode["phases"].values()))
    for key in ("completions_per_s", "generated_tokens_per_s", "training_tokens_per_s", "peak_memory_gb"):
        assert step[key] > 0, key


def test_both_modes_timed(results):
    assert set(results["modes"]) == {"ours", "naive"}
    for mode in results["modes"].values():  # beta 0.04 and mu 1 by default: no old_logprobs pass
        _check_mode(mode, ["rollout", "reference", "forward_backward", "optimizer"])
    sh = results["shape"]
    assert (sh["prompts"], sh["group_size"], sh["new_tokens"], sh["mu"]) == (1, 2, 4, 1)
    assert (sh["top_k"], sh["lr"], sh["beta"]) == (50, 1e-6, 0.04)  # R1-AQA's settings without --config
    assert set(results["speedup"]) == {"rollout", "reference", "forward_backward", "optimizer", "step"}
    # generated tokens over the rollout; prompt + completion tokens over the forward/backward
    ours = results["modes"]["ours"]
    assert ours["phases"]["rollout"]["tokens_per_s"] == pytest.approx(2 * 4 / ours["phases"]["rollout"]["seconds"])
    assert sh["tokens_per_logprob_pass"] == 2 * sh["prompt_tokens"] + 2 * 4
    assert ours["step"]["training_tokens_per_s"] == pytest.approx(
        sh["tokens_per_logprob_pass"] / ours["phases"]["forward_backward"]["seconds"])


def test_ours_and_naive_compute_the_same_thing(results):
    check = results["check"]
    assert check["logp_max_abs_diff"] < 1e-4
    assert check["loss_abs_diff"] < 1e-5 and check["loss_ours"] != 0.0
    # the gradients reach the audio encoder, the projector, the decoder and lm_head alike
    for name, diff in check["grad_max_rel_diff"].items():
        assert diff < 1e-4, name


def test_the_ablation_modes_are_timed_and_all_compute_the_same_thing(tmp_path):
    """--mode ablation: ours, the trainer with both exact savings off (per_row), each saving
    alone, and naive, alternating; every one gives naive's log-probs on the same completions."""
    r = bench_step.main(["--model", "tiny", "--mode", "ablation", "--device", "cpu", "--prompts", "2",
                         "--group-size", "2", "--new-tokens", "3", "--clip-seconds", "1.0", *FAST,
                         "--json", str(tmp_path / "abl.json")])
    assert list(r["modes"]) == ["ours", "per_row", "real_frames", "shared_prefix", "naive"]
    for mode in r["modes"].values():
        _check_mode(mode, ["rollout", "reference", "forward_backward", "optimizer"])
    assert set(r["speedup_vs_per_row"]) == {"rollout", "reference", "forward_backward", "optimizer", "step"}
    diffs = r["check"]["logp_max_abs_diff_vs_naive"]
    assert set(diffs) == {"ours", "per_row", "real_frames", "shared_prefix"}
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_settings_from_a_training_config(tmp_path):
    """--config with overrides: the model built at model.path (not in the repo's artifacts/),
    the shape, mu > 1 (the old log-prob pass), micro-batches, and the CPU-offloaded optimizer."""
    out = tmp_path / "cfg.json"
    r = bench_step.main([
        "--config", str(ROOT / "configs" / "tiny.yaml"), f"model.path={tmp_path / 'tiny'}",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=3", "algorithm.mu=2",
        "algorithm.micro_batch_prompts=1", "algorithm.loss_type=dr_grpo", "--cpu-offload", *FAST,
        "--no-check", "--json", str(out)])
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert json.loads(out.read_text())["shape"] == r["shape"]
    sh = r["shape"]
    assert (sh["prompts"], sh["group_size"], sh["new_tokens"], sh["mu"]) == (2, 2, 3, 2)
    # from configs/tiny.yaml: no top-k, lr 1e-3
    assert (sh["top_k"], sh["lr"], sh["micro_batch_prompts"], sh["loss_type"]) == (0, 1e-3, 1, "dr_grpo")
    assert sh["cpu_offload"] and r["config_file"].endswith("tiny.yaml")
    for mode in r["modes"].values():
        _check_mode(mode, ["rollout", "reference", "old_logprobs", "forward_backward", "optimizer"])
    assert "check" not in r


def test_cpu_offloaded_adamw_matches_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    cfg = bench_step.load_config(None, ["optimizer.lr=0.1", "optimizer.weight_decay=0.01"])
    plain = bench_step.make_optimizer(a, cfg, "adamw", cpu_offload=False)
    offloaded = bench_step.make_optimizer(b, cfg, "adamw", cpu_offload=True)
    x = torch.randn(5, 4)
    for _ in range(3):
        for model, opt in ((a, plain), (b, offloaded)):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)
        assert pb.grad is None


def test_naive_logprobs_match_ours_on_a_padded_batch(tiny_checkpoint):
    """Left padding (two prompts of different lengths), temperature != 1, fp32, generation in chunks."""
    setup = bench_step.checkpoint_setup(tiny_checkpoint, "tiny", n_prompts=2, clip_seconds=2.0,
                                        device=torch.device("cpu"), dtype=torch.float32, new_tokens=3)
    assert (setup.prompts["attention_mask"] == 0).any()  # really padded
    model = setup.model.eval()
    ids = bench_step.naive_generate(model, setup.prompts, setup.settings, 2, step=0, chunk_prompts=1)  # [4, 3]
    assert ids.shape == (4, 3)
    assert not torch.isin(ids, torch.tensor(setup.settings.suppress_token_ids)).any()  # no end token: fixed length
    with torch.no_grad():
        ours = bench_step.ours_logprobs(model, setup.prompts, ids, 2, temperature=0.7)
        naive = bench_step.naive_logprobs(model, setup.prompts, ids, 2, temperature=0.7)
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-4)


def test_ablations_run(tmp_path):
    from benchmarks import ablations

    r = ablations.main(["--model", "tiny", "--prompts", "1", "--group-size", "2", "--new-tokens", "2",
                        "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "abl.json")])
    assert list(r["rows"]) == ["encoder forward", "encoder fwd+bwd", "log-prob head fwd+bwd", "prefill (+1 token)",
                               "sampling (T tokens)", "encoder real frames", "shared prefix fwd+bwd"]
    assert all(row["naive_s"] > 0 and row["ours_s"] > 0 for row in r["rows"].values())


def test_7b_random_refuses_cpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench_step.main(["--model", "7b-random", "--device", "cpu"])


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_fails(monkeypatch, capsys, tmp_path):
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not list(tmp_path.iterdir())  # nothing written


def _check_gpu_check_result(result: dict, recipes: list[str]):
    for name in recipes:
        r = result["recipes"][name]
        assert list(r["phases"]) == ["rollout", "reference", "update"]
        for phase in r["phases"].values():
            assert phase["seconds"] > 0 and phase["peak_gb"] > 0
            assert phase["reserved_gb"] is None  # the CPU has no caching allocator (on a GPU: >= peak_gb)
        for phase in ("rollout", "update"):
            ph = r["phases"][phase]
            assert ph["plan_over_measured"] == pytest.approx(ph["plan_gb"] / ph["peak_gb"])
        assert r["shape"]["T"] == 4  # the end tokens are suppressed: every completion has the full length
        assert 0 <= r["sampler_logprob_diff"]["mean"] <= r["sampler_logprob_diff"]["max"] < 0.05  # bf16
    d = result["recipes"]["lora"]["decode"]
    assert d["kv_read_per_step_gb"] > 0  # the KV cache is read at every step, besides the weights
    assert d["floor_seconds_per_step"] == pytest.approx(
        (d["weights_read_per_step_gb"] + d["kv_read_per_step_gb"]) / d["copy_bandwidth_gb_per_s"])
    assert d["tokens_per_second"] == pytest.approx(d["rows"] / d["seconds_per_step"])


def test_gpu_check_on_the_cpu_measures_both_recipes_and_writes_json_and_markdown(tmp_path):
    """benchmarks/gpu_check.py's logic at the tiny shape: both recipes' phases measured against
    the plan, decoding against the bandwidth floor, the gap; one JSON and one table, named 'cpu'."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--shape", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    _check_gpu_check_result(result, ["lora", "full"])
    table = (tmp_path / "gpu_check_cpu.md").read_text()
    for recipe in ("lora", "full"):
        for phase in ("rollout", "reference", "update"):
            assert f"| {recipe} | 2 | 1 x 2 x 4 " in table and f"| {phase} |" in table
    assert "decode:" in table and "sampler/trainer gap (lora, bf16)" in table
    assert result["two_gpu_straddle"] == {"skipped": "needs 2 GPUs, 0 visible"}
    assert "straddling the log-prob chunk: skipped (needs 2 GPUs, 0 visible)" in table


@pytest.mark.slow
def test_gpu_check_two_rank_straddle_runs_one_sharded_update_on_two_processes(tmp_path):
    """The two-GPU check's launcher and worker, on 2 CPU processes over gloo: two FSDP2 updates
    whose loss tokens straddle the log-prob chunk on one rank only, taken on both."""
    from benchmarks import gpu_check

    r = gpu_check.two_rank_straddle(tmp_path, "cpu")
    assert r["ok"], r.get("error")
    assert r["world"] == 2 and r["backend"] == "gloo" and r["updates"] == 2 and r["losses_finite"]


@pytest.mark.slow
def test_gpu_check_at_the_7b_widths_on_the_cpu(tmp_path):
    """The same at the slice of the 7B (every width, vocabulary 156032, 1 + 1 layers, bf16): the
    LoRA recipe's step within 15 % of the plan in both phases the plan covers; the full recipe's
    plan exceeds the CPU's budget of 8 GB even at one layer, so it is skipped, saying why."""
    from benchmarks import gpu_check

    assert gpu_check.main(["--device", "cpu", "--shape", "slice", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    _check_gpu_check_result(result, ["lora"])
    lora = result["recipes"]["lora"]
    assert lora["layers"] == 1 and lora["shape"]["P"] > 250  # a 10 s clip: 250 audio tokens
    for phase in ("rollout", "update"):
        assert 0.85 <= lora["phases"][phase]["plan_over_measured"] <= 1.15, lora["phases"]
    assert "exceeds" in result["recipes"]["full"]["skipped"]


def test_gpu_check_kv_read_is_the_cache_a_decoding_step_reads():
    """Qwen2-Audio-7B's decoder (32 layers, 32 KV heads of 128) at 8 rows and 350 positions, bf16:
    8 x 350 x 32 x 2 x 4096 x 2 bytes = 1.47 GB per step, as much as a tenth of the weights."""
    from types import SimpleNamespace

    from benchmarks.gpu_check import kv_read_per_step

    c = SimpleNamespace(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32)
    assert kv_read_per_step(c, rows=8, positions=350, element_size=2) == pytest.approx(1.468e9, rel=1e-3)


def test_timed_steps_run_no_memory_probe(monkeypatch, tmp_path):
    """The peak-memory reset (gc.collect, malloc_trim) falls inside the production step's timed
    regions, so it runs only in the one memory step per mode after the timed ones."""
    calls = []
    real_reset = bench_step.reset_peak
    real_step = bench_step.grpo_step

    def counting_reset(device):
        calls[-1][1] += 1
        real_reset(device)

    def recording_step(bench, mode, step, probe_memory=False):
        calls.append([probe_memory, 0])
        return real_step(bench, mode, step, probe_memory=probe_memory)

    monkeypatch.setattr(bench_step, "reset_peak", counting_reset)
    monkeypatch.setattr(bench_step, "grpo_step", recording_step)
    r = bench_step.main(["--model", "tiny", "--mode", "both", "--device", "cpu", "--prompts", "1", "--group-size", "2",
                         "--new-tokens", "2", "--threads", "1", "--repeats", "2", "--warmup", "1", "--no-check"])
    timed_steps = [n for probe, n in calls if not probe]
    probe_steps = [n for probe, n in calls if probe]
    assert len(timed_steps) == 2 * 3 and all(n == 0 for n in timed_steps)  # 2 modes x (1 warm-up + 2 timed)
    assert len(probe_steps) == 2 and all(n >= 4 for n in probe_steps)  # the memory step of each mode
    for mode in r["modes"].values():
        assert all(ph["peak_memory_gb"] > 0 for ph in mode["phases"].values())
        assert len(mode["step"]["all_seconds"]) == 2


def test_decode_rate_times_both_decoders_beside_the_floor(tmp_path):
    """benchmarks/decode_rate.py on the tiny model: every decoder timed (it checks that they
    sample the same tokens), rates and the floor positive, the completions' lengths recorded."""
    from benchmarks import decode_rate

    r = decode_rate.main(["--shapes", "tiny", "--repeats", "1", "--threads", "1", "--json", str(tmp_path / "d.json")])
    shape = r["shapes"]["tiny"]
    assert set(shape["decoders"]) == {"dynamic", "static", "static_g_copies"}
    assert shape["generated_tokens"] == sum(shape["completion_lengths"]) > 0
    assert shape["floor_decode_seconds"] > 0 and shape["memory_bandwidth_gb_s"] > 0
    for d in shape["decoders"].values():
        assert d["seconds"] > 0 and d["tokens_per_s"] > 0
    assert json.loads((tmp_path / "d.json").read_text())["shapes"]["tiny"]["generated_tokens"] == \
        shape["generated_tokens"]
