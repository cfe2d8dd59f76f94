"""Post-train Qwen2-Audio with GRPO (or the SFT baseline) from a YAML config.

    python train.py --config configs/tiny.yaml
    torchrun --nproc_per_node 8 train.py --config configs/r1_aqa.yaml model.path=pretrained/Qwen2-Audio-7B-Instruct
    python train.py --config configs/tiny.yaml --resume latest

Overrides are ``section.key=value`` (anywhere on the line); see grpo/config.py for every key.
A fresh run refuses a run directory that already holds a run (--resume continues it,
run.overwrite=true moves it aside). Exit status: 0 done, 1 an error (one line; --debug for
the traceback), 2 a config error, 128 + N stopped by signal N after saving (143: SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import sys

from grpo.cli import run_reporting_errors, split_overrides
from grpo.config import load_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, section.key=value overrides); exits with a usage message on bad options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint of the run directory, or from a checkpoint path")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="with --resume: accept keys that change the optimisation or the data order "
                             "(logged, saved as config.resume-step<N>.yaml)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of configuration and data errors")
    # overrides are told apart by their shape first: `--resume model.path=x` must not resume from "model.path=x"
    rest, overrides = split_overrides(argv)
    return parser.parse_args(rest), overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return run_reporting_errors(lambda: _train(args, overrides), debug=args.debug)


def _train(args, overrides: list[str]) -> int:
    cfg = load_config(args.config, overrides, require_paths=True)

    from models.distributed import cleanup, init_distributed

    info = init_distributed(timeout_s=cfg.distribution.timeout_minutes * 60)
    # rank 0 tells the story; the other ranks speak only when something is wrong
    logging.basicConfig(level=logging.INFO if info.rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank{info.rank}] %(levelname)s %(name)s: %(message)s")
    from grpo.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg, info, resume=args.resume, allow_config_change=args.allow_config_change)
        final = trainer.train()
        if info.rank == 0 and final:
            shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/reward", "eval/"))}
            logging.getLogger("train").info("done at step %d: %s", trainer.step, shown)
    finally:
        if trainer is not None:
            trainer.close()
        cleanup()
    # stopped by a signal after saving: say so in the exit status, as a killed process would
    return 128 + trainer.stopped_by_signal if trainer.stopped_by_signal else 0


if __name__ == "__main__":
    sys.exit(main())
