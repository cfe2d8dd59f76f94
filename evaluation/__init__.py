"""Benchmark evaluation (``evaluate.py``): greedy answers of checkpoints, scored the MMAU way.

Not part of training: it uses ``data`` (datasets, scoring), ``models`` (loading) and, from
``grpo``, the generation path (``grpo.rollout.greedy_answers``, which the trainer's held-out
evaluation uses too), the config checks and the run directory's checkpoint layout. Nothing
in ``grpo`` imports it.
"""
