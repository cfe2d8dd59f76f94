"""Smoke test of benchmarks/bench_step.py on the tiny model: both modes run, and they agree.

The cross-check is the point: the naive mode (plain model(**inputs) on G-times repeated inputs,
full-sequence fp32 log_softmax) and ours (each clip encoded once, logits only at completion
positions) must give the same log-probs, loss and gradients on the same completions, or the
speed-up would be comparing two different computations.
"""

import json

import pytest

from benchmarks import bench_step


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    bench_step.main(["--model", "tiny", "--mode", "both", "--device", "cpu", "--prompts", "1", "--group-size", "2",
                     "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    return json.loads(out.read_text())


def test_both_modes_timed(results):
    assert set(results["modes"]) == {"ours", "naive"}
    for mode in results["modes"].values():
        assert set(mode["phases"]) == {"generation", "reference", "update"}  # beta 0.04 by default
        for phase in [*mode["phases"].values(), mode["total"]]:
            assert phase["seconds"] > 0 and phase["tokens_per_s"] > 0 and phase["peak_memory_gb"] > 0
    assert results["shape"]["prompts"] == 1 and results["shape"]["group_size"] == 2
    assert set(results["speedup"]) == {"generation", "reference", "update", "total"}


def test_ours_and_naive_compute_the_same_thing(results):
    check = results["check"]
    assert check["logp_max_abs_diff"] < 1e-4
    assert check["loss_abs_diff"] < 1e-5 and check["loss_ours"] != 0.0
    # the gradients reach the audio encoder, the projector, the decoder and lm_head alike
    for name, diff in check["grad_max_rel_diff"].items():
        assert diff < 1e-4, name


def test_naive_logprobs_match_ours_on_a_padded_batch(tiny_checkpoint):
    """Left padding (two prompts of different lengths), temperature != 1, fp32."""
    import torch

    setup = bench_step.checkpoint_setup(tiny_checkpoint, "tiny", n_prompts=2, clip_seconds=2.0,
                                        device=torch.device("cpu"), dtype=torch.float32, new_tokens=3)
    assert (setup.prompts["attention_mask"] == 0).any()  # really padded
    model = setup.model.eval()
    ids = bench_step.naive_generate(model, setup.prompts, setup.settings, 2, step=0)  # [4, 3]
    assert ids.shape == (4, 3)
    assert not torch.isin(ids, torch.tensor(setup.settings.suppress_token_ids)).any()  # no end token: fixed length
    with torch.no_grad():
        ours = bench_step.ours_logprobs(model, setup.prompts, ids, 2, temperature=0.7)
        naive = bench_step.naive_logprobs(model, setup.prompts, ids, 2, temperature=0.7)
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-4)


def test_7b_random_refuses_cpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bench_step.main(["--model", "7b-random", "--device", "cpu"])
