"""Evaluate checkpoints on an audio QA benchmark (MMAU, MMAR, AVQA, synthetic) and score them.

    python evaluate.py --config configs/eval_mmau_testmini.yaml --checkpoint pretrained/Qwen2-Audio-7B-Instruct runs/r1_aqa
    torchrun --nproc_per_node 8 evaluate.py --config configs/eval_mmau_testmini.yaml --checkpoint runs/r1_aqa data.version=v05.15.25
    python evaluate.py --score-only eval/x/predictions.json --output eval/x/rescored.json

A --checkpoint is a transformers-format directory, or a run directory standing for all its
exports (checkpoints/step_<N>/hf). Predictions already complete for a checkpoint (same
weights, data, prompt template and length limit) are reused unless --force. Overrides are
section.key=value, anywhere on the line, also after --checkpoint (sections data, generation,
model, output: see evaluation/config.py for every key). Exit status: 0 done, 1 an error (one
line, from one rank under torchrun; --debug for the traceback), 2 a config error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from grpo.cli import bare_override_hint, run_reporting_errors, split_overrides


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, section.key=value overrides); exits with a usage message on bad options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML evaluation config")
    parser.add_argument("--checkpoint", nargs="+", default=[], metavar="DIR",
                        help="checkpoint directories and/or run directories")
    parser.add_argument("--force", action="store_true", help="regenerate even when predictions exist")
    parser.add_argument("--score-only", metavar="PREDICTIONS", help="rescore a benchmark-schema predictions file")
    parser.add_argument("--output", metavar="SCORES", help="with --score-only: where to write the scores JSON")
    parser.add_argument("--debug", action="store_true", help="show the traceback of configuration and data errors")
    # overrides are told apart by their shape first: --checkpoint takes any number of values
    rest, overrides = split_overrides(argv)
    from evaluation.config import EvalConfig

    hint = bare_override_hint(rest, EvalConfig)
    if hint:
        parser.error(hint)
    args = parser.parse_args(rest)
    if args.score_only:
        if args.config or args.checkpoint or overrides:
            parser.error("--score-only takes only --output")
    else:
        if not args.config or not args.checkpoint:
            parser.error("--config and --checkpoint are required (or --score-only)")
        if args.output:
            parser.error("--output goes with --score-only; evaluations write to output.dir")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    # rank 0 tells the story; the other ranks speak only when something is wrong
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.ERROR,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    return run_reporting_errors(lambda: _evaluate(args, overrides), debug=args.debug)


def _evaluate(args, overrides: list[str]) -> int:
    if args.score_only:
        from evaluation.report import score_file

        score_file(args.score_only, args.output)
        return 0
    from evaluation.config import load_eval_config
    from models.loading import quiet_transformers

    quiet_transformers()
    from evaluation.sweep import run_evaluation

    from grpo.cli import alike_on_every_rank

    with alike_on_every_rank():
        config = load_eval_config(args.config, overrides)
    from models.distributed import torn_down_on_exit

    with torn_down_on_exit():  # the process group goes now, not during interpreter exit
        run_evaluation(config, args.checkpoint, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
