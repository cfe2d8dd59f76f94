"""Post-train Qwen2-Audio with GRPO (or the SFT baseline) from a YAML config.

    python train.py --config configs/tiny.yaml
    torchrun --nproc_per_node 8 train.py --config configs/r1_aqa.yaml model.path=pretrained/Qwen2-Audio-7B-Instruct
    python train.py --config configs/tiny.yaml --resume latest

Overrides are ``section.key=value``; see grpo/config.py for every key.
"""

from __future__ import annotations

import argparse
import logging
import sys

from grpo.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint of the run directory, or from a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2

    from models.distributed import cleanup, init_distributed

    info = init_distributed()
    # rank 0 tells the story; the other ranks speak only when something is wrong
    logging.basicConfig(level=logging.INFO if info.rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank{info.rank}] %(levelname)s %(name)s: %(message)s")
    from grpo.trainer import Trainer

    try:
        trainer = Trainer(cfg, info, resume=args.resume)
        final = trainer.train()
        if info.rank == 0 and final:
            shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/reward", "eval/"))}
            logging.getLogger("train").info("done at step %d: %s", trainer.step, shown)
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
