"""Evaluate checkpoints on an audio QA benchmark (MMAU, MMAR, AVQA, synthetic) and score them.

    python evaluate.py --config configs/eval_mmau_testmini.yaml --checkpoint pretrained/Qwen2-Audio-7B-Instruct runs/r1_aqa
    torchrun --nproc_per_node 8 evaluate.py --config configs/eval_mmau_testmini.yaml --checkpoint runs/r1_aqa data.version=v05.15.25
    python evaluate.py --score-only eval/x/predictions.json --output eval/x/rescored.json

A --checkpoint is a transformers-format directory, or a run directory standing for all its
exports (checkpoints/step_<N>/hf). Predictions already complete for a checkpoint (same data,
prompt template and length limit) are reused unless --force. Overrides are section.key=value
(sections data, generation, model, output: see grpo/evaluation.py for every key).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML evaluation config")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR",
                        help="checkpoint directories and/or run directories")
    parser.add_argument("--force", action="store_true", help="regenerate even when predictions exist")
    parser.add_argument("--score-only", metavar="PREDICTIONS", help="rescore a benchmark-schema predictions file")
    parser.add_argument("--output", metavar="SCORES", help="with --score-only: where to write the scores JSON")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    # rank 0 tells the story; the other ranks speak only when something is wrong
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")

    from grpo.config import ConfigError
    from grpo.evaluation import load_eval_config, run_evaluation, score_file

    if args.score_only:
        if args.config or args.checkpoint or args.overrides:
            parser.error("--score-only takes only --output")
        score_file(args.score_only, args.output)
        return 0
    if not args.config or not args.checkpoint:
        parser.error("--config and --checkpoint are required (or --score-only)")
    if args.output:
        parser.error("--output goes with --score-only; evaluations write to output.dir")
    try:
        config = load_eval_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        run_evaluation(config, args.checkpoint, force=args.force)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
