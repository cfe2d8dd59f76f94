"""Post-train Qwen2-Audio with GRPO (or the SFT baseline) from a YAML config.

    .venv/bin/python train.py --config configs/tiny.yaml
    .venv/bin/torchrun --nproc_per_node 8 train.py --config configs/r1_aqa.yaml model.path=pretrained/Qwen2-Audio-7B-Instruct
    .venv/bin/python train.py --config configs/tiny.yaml --resume
    .venv/bin/python train.py --config configs/r1_aqa_lora_24gb.yaml --plan          # the memory plan only
    .venv/bin/python train.py --config configs/r1_aqa.yaml --plan --gpus 8 --gpu-memory-gb 80

Overrides are ``section.key=value`` (anywhere on the line); see grpo/config.py for every key.
A fresh run refuses a run directory that already holds a run (--resume continues it,
run.overwrite=true moves it aside); one where no step completed (a start that failed) is
reused. --resume with no checkpoint is an error; --resume auto then starts fresh (a job
restarted with the same command). --resume on a finished run (its checkpoint is at the last
step) trains nothing, says so and exits 0; --resume auto run.overwrite=true (what `make train`
runs) continues a stopped run and moves a finished one aside to start afresh.
Exit status: 0 done (or nothing left to train), 1 an error (one line, from one rank under
torchrun; --debug for the traceback), 2 a config error or a bad command line, 128 + N stopped
by signal N after saving (143: SIGTERM, 130: Ctrl-C); --plan: 0 the run fits, 1 it does not.
"""

from __future__ import annotations

import argparse
import logging
import sys

from grpo.cli import bare_override_hint, run_reporting_errors, split_overrides
from grpo.config import load_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, section.key=value overrides); exits with a usage message on bad options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint of the run directory (an error when there is "
                             "none), from a checkpoint path, or 'auto': the latest if any, else a fresh start")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept keys that change the optimisation or the data order "
                             "(logged, saved as config.resume-step<N>.yaml)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of configuration and data errors")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory plan per GPU (from the config, no weights loaded) and exit")
    parser.add_argument("--gpus", type=int, default=None,
                        help="with --plan: the number of GPUs to plan for (default: WORLD_SIZE, else 1)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="memory per GPU to plan against (default: distribution.gpu_memory_gb, the "
                             "visible GPU's, or 80)")
    # overrides are told apart by their shape first: `--resume model.path=x` must not resume from "model.path=x"
    rest, overrides = split_overrides(argv)
    from grpo.config import Config

    hint = bare_override_hint(rest, Config)
    if hint:
        parser.error(hint)
    return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plan:
        return run_reporting_errors(lambda: _plan(args, overrides), debug=args.debug)
    return run_reporting_errors(lambda: _train(args, overrides), debug=args.debug)


def _not_a_training_config(path: str) -> str | None:
    """Why ``path`` holds no training run (an evaluation or architecture file), or None."""
    import yaml

    try:
        mapping = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError):
        return None  # load_config reports it
    if not isinstance(mapping, dict):
        return None
    if "text_config" in mapping:
        return (f"{path} describes a model architecture (for benchmarks/bench_step.py and model.architecture), "
                "not a training run: plan a training config, e.g. configs/r1_aqa.yaml")
    if "generation" in mapping or ("output" in mapping and "run" not in mapping):
        return (f"{path} is an evaluate.py config: evaluation holds the model once in its dtype plus the KV cache of "
                "generation.batch_size rows (no gradients, optimizer or reference); plan the training config")
    return None


def _plan(args, overrides: list[str]) -> int:
    import os

    reason = _not_a_training_config(args.config)
    if reason:
        print(reason)
        return 0
    cfg = load_config(args.config, overrides)
    from grpo.memory_plan import NO_GPU, device_memory_gb, plan_memory

    world = args.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    memory, source = device_memory_gb(cfg, args.gpu_memory_gb)
    plan = plan_memory(cfg, world_size=world, device_type="cuda", gpu_memory_gb=memory)
    print(plan.render(assumed_memory=source == NO_GPU))
    print(f"  device memory from: {source}")
    return 0 if plan.fits else 1  # a script can tell a config that does not fit


def _train(args, overrides: list[str]) -> int:
    import os

    from grpo.cli import alike_on_every_rank
    from grpo.setup import check_inputs, settle_resume

    with alike_on_every_rank():  # before the process group: every rank stops alike, one reports it
        cfg = load_config(args.config, overrides, require_paths=True)
        args.resume, told, nothing_to_train = settle_resume(cfg, args.resume)
        if nothing_to_train:
            if int(os.environ.get("RANK", "0")) == 0:
                print(told, flush=True)
            return 0
        check_inputs(cfg, args.resume)

    from models.distributed import init_distributed, torn_down_on_exit
    from models.loading import quiet_transformers

    quiet_transformers()

    info = init_distributed(device=cfg.distribution.device, timeout_s=cfg.distribution.timeout_minutes * 60)
    # rank 0 tells the story; the other ranks speak only when something is wrong
    logging.basicConfig(level=logging.INFO if info.rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank{info.rank}] %(levelname)s %(name)s: %(message)s")
    if told and info.rank == 0:
        logging.getLogger("train").info("%s", told)
    with torn_down_on_exit():  # the process group goes now, not during interpreter exit
        return _run(cfg, info, args)


def _run(cfg, info, args) -> int:
    """Train to the end; the exit status (128 + N when stopped by signal N after saving)."""
    from grpo.trainer import Trainer

    if info.rank == 0:  # the plan first: a run that cannot fit says so before loading for minutes
        _log_plan(cfg, info, args.gpu_memory_gb)

    trainer = Trainer(cfg, info, resume=args.resume, allow_config_change=args.allow_config_change)
    try:
        final = trainer.train()
    finally:
        trainer.close()  # curves flushed, run directory released, model and optimizer dropped
    if info.rank == 0 and final:
        shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/reward", "eval/"))}
        if trainer.stopped_by_signal:
            logging.getLogger("train").info("stopped at step %d of %d (checkpoint saved): %s", trainer.step,
                                            trainer.total_steps, shown)
        else:
            logging.getLogger("train").info("done at step %d: %s", trainer.step, shown)
    # stopped by a signal after saving: say so in the exit status, as a killed process would
    return 128 + trainer.stopped_by_signal if trainer.stopped_by_signal else 0


def _log_plan(cfg, info, gpu_memory_gb) -> None:
    import torch

    from grpo.memory_plan import device_memory_gb, host_memory_gb, plan_memory

    log = logging.getLogger("train")
    try:
        with torch.random.fork_rng(devices=[]):  # building the meta model must not move the run's RNG
            if info.device.type == "cuda":
                memory, _ = device_memory_gb(cfg, gpu_memory_gb)
                plan = plan_memory(cfg, world_size=info.world_size, device_type="cuda", gpu_memory_gb=memory)
            else:  # the processes share this machine's RAM
                plan = plan_memory(cfg, world_size=info.world_size, device_type="cpu",
                                   gpu_memory_gb=host_memory_gb() / info.world_size)
        log.info("%s", plan.render())
        if info.device.type == "cuda" and not plan.fits:
            log.warning("the plan says this run does not fit the GPU; starting anyway")
    except Exception as err:  # the plan informs; it never stops a run
        log.warning("no memory plan (%s: %s)", type(err).__name__, err)


if __name__ == "__main__":
    sys.exit(main())
