"""The tiny demo's GRPO step, full fine-tune against configs/tiny_lora.yaml's adapters.

`benchmarks/plan_check.py`'s tiny-shape measurement (one process, one rollout round, no warm-up;
the first step not measured) with the adapters of configs/tiny_lora.yaml (decoder and head,
r = 16, alpha = 32, no dropout) instead of plan_check's own (decoder, dropout 0.05). The two
alternate ``--repeats`` times, so a change in the machine's load falls on both.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/tiny_lora_step.py \
        --json benchmarks/results/cpu-tiny-lora-recipe-step.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpo.config as config  # noqa: E402
import plan_check  # noqa: E402

RECIPE = ["lora.dropout=0.0", "lora.targets=[decoder,lm_head]"]  # configs/tiny_lora.yaml's adapters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timed", type=int, default=5, help="steps timed per measurement (the median is reported)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    load = config.load_config

    def with_recipe(path, overrides=(), **kw):  # plan_check's LoRA overrides come first; these win
        overrides = list(overrides)
        return load(path, overrides + RECIPE if "lora.enabled=true" in overrides else overrides, **kw)

    config.load_config = with_recipe
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for lora in (False, True):
                r = plan_check.measure("tiny", lora, 1, Path(tmp), timed=args.timed)
                r.pop("plan")
                results.append({**r, "repeat": rep})
                print(f"{'LoRA' if lora else 'full'} trainable {r['trainable']:,} step {r['step_seconds']:.3f} s "
                      f"tensor peak {r['measured_tensor_peak_gb'] * 1024:.1f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
