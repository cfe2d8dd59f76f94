"""The YAML config loader: the shipped recipes say what they claim; bad keys and types are named errors.
(Every shipped training config loads and plans: tests/test_memory_plan.py.)"""

from pathlib import Path

import pytest
import yaml

from grpo.config import ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
def test_r1_aqa_config_is_the_paper_recipe():
    cfg = load_config(CONFIGS / "r1_aqa.yaml")
    assert (cfg.rollout.group_size, cfg.rollout.prompts_per_step) == (8, 16)
    assert (cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p) == (1.0, 50, 1.0)
    assert (cfg.algorithm.beta, cfg.algorithm.kl_estimator, cfg.algorithm.mu) == (0.04, "k3", 1)
    assert (cfg.optimizer.lr, cfg.optimizer.schedule, cfg.optimizer.max_grad_norm) == (1e-6, "linear", 1.0)
    assert cfg.rollout.max_new_tokens == 256 and cfg.data.prompt_template == 2
    assert cfg.run.steps == 1000 and cfg.checkpointing.every == 100
    assert load_config(CONFIGS / "r1_aqa_think.yaml").data.prompt_template == 3
    dapo = load_config(CONFIGS / "dapo_avqa.yaml").algorithm
    assert (dapo.loss_type, dapo.eps_high, dapo.beta, dapo.dynamic_sampling) == ("token_mean", 0.28, 0.0, True)
    dr = load_config(CONFIGS / "dr_grpo_avqa.yaml").algorithm
    assert (dr.loss_type, dr.advantage_scale) == ("dr_grpo", "none")


def write(tmp_path, mapping) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return path


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, {"rollout": {"group_sise": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "rollout.group_sise" in msg and str(path) in msg and "group_size" in msg


def test_unknown_section_names_closest(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optimizer'"):
        load_config(write(tmp_path, {"optimiser": {"lr": 1.0}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimizer.lr' in .*c.yaml must be a number"):
        load_config(write(tmp_path, {"optimizer": {"lr": "fast"}}))
    with pytest.raises(ConfigError, match="'rollout.group_size'.*integer"):
        load_config(write(tmp_path, {"rollout": {"group_size": 2.5}}))
    with pytest.raises(ConfigError, match="true or false"):
        load_config(write(tmp_path, {"data": {"shuffle": "yes please"}}))


def test_value_outside_choices_is_named(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.loss_type.*choose one of"):
        load_config(write(tmp_path, {"algorithm": {"loss_type": "mean"}}))


def test_overrides_parse_yaml_values_and_are_checked(tmp_path):
    cfg = load_config(write(tmp_path, {}), ["rollout.group_size=4", "optimizer.lr=3e-4",
                                           "algorithm.rewards={accuracy: 2.0}", "data.eval_path=null"])
    assert cfg.rollout.group_size == 4 and cfg.optimizer.lr == 3e-4
    assert cfg.algorithm.rewards == {"accuracy": 2.0} and cfg.data.eval_path is None
    with pytest.raises(ConfigError, match="command-line override 'rollout.groupsize=4'.*group_size"):
        load_config(None, ["rollout.groupsize=4"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["group_size=4"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "r1_aqa.yaml", ["run.seed=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_the_24gb_lora_config_is_r1_aqas_recipe_with_adapters():
    full, lora = load_config(CONFIGS / "r1_aqa.yaml"), load_config(CONFIGS / "r1_aqa_lora_24gb.yaml")
    assert lora.lora.enabled and not full.lora.enabled
    assert (lora.distribution.fsdp, lora.distribution.activation_checkpointing, lora.model.dtype) == (
        "never", True, "bfloat16")
    for section in ("rollout", "algorithm"):  # the same sampling, loss and KL, apart from generation batching
        a, b = vars(getattr(full, section)), vars(getattr(lora, section))
        assert {k: v for k, v in a.items() if k != "generation_batch_prompts"} == \
               {k: v for k, v in b.items() if k != "generation_batch_prompts"}, section


@pytest.mark.parametrize("overrides,match", [
    (["algorithm.clip_ratio_c=1.0"], "clip_ratio_c"),
    (["algorithm.clip_ratio_c=3", "algorithm.policy_loss_type=sapo"], "clip_ratio_c"),
    (["algorithm.policy_loss_type=ppo"], "policy_loss_type"),
    (["algorithm.advantage_baseline=median"], "advantage_baseline"),
    (["algorithm.reward_normalization=rank"], "reward_normalization"),
    (["algorithm.top_entropy_fraction=0"], "top_entropy_fraction"),
    (["algorithm.overlong_buffer=300", "rollout.max_new_tokens=256"], "overlong_buffer"),
    (["algorithm.sapo_tau_neg=0"], "sapo_tau_neg"),
    (["algorithm.vespo_lambda_neg=0"], "vespo_lambda_neg"),
    (["algorithm.vespo_k_pos=-1"], "vespo_k_pos"),
    (["algorithm.loss_type=luspo2"], "loss_type"),
    (["algorithm.rollout_is_level=tokens"], "rollout_is_level"),
    (["algorithm.rollout_is_cap=0"], "rollout_is_cap"),
    (["algorithm.rollout_rs_low=3", "algorithm.rollout_rs_high=2"], "rollout_rs_low"),
    (["algorithm.ref_sync_every=10", "algorithm.beta=0"], "ref_sync_every"),
    (["algorithm.ref_sync_every=10", "lora.enabled=true", "algorithm.ref_sync_alpha=0.5"], "ref_sync_alpha"),
    (["algorithm.ref_sync_alpha=0"], "ref_sync_alpha"),
])
def test_family_keys_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_luspo_and_vespo_recipes_turn_them_on():
    luspo = load_config(CONFIGS / "luspo_avqa.yaml").algorithm
    assert (luspo.loss_type, luspo.importance_level) == ("luspo", "sequence") and luspo.mu > 1
    vespo = load_config(CONFIGS / "vespo_avqa.yaml").algorithm
    assert (vespo.policy_loss_type, vespo.loss_type) == ("vespo", "token_mean") and vespo.mu > 1


def test_cispo_recipe_turns_cispo_on():
    cfg = load_config(CONFIGS / "cispo_avqa.yaml")
    assert cfg.algorithm.policy_loss_type == "cispo" and cfg.algorithm.mu > 1
    assert load_config(None, ["algorithm.clip_ratio_c=3"]).algorithm.clip_ratio_c == 3.0
