"""Shared fixtures: tiny checkpoints built in code (well under a second each), one per family.

``tiny_checkpoint`` is the tiny Qwen2-Audio unless a test asks for a family: tests marked
``@both_families`` (or a module's ``pytestmark = both_families``) run once per family, the
tiny Qwen2.5-Omni thinker included, through the same fixtures (tiny_processor, tiny_model).
"""

import pytest
import torch

FAMILIES = ("qwen2_audio", "qwen2_5_omni")

# run a test (or a module) once on each family's tiny checkpoint
both_families = pytest.mark.parametrize("tiny_checkpoint", FAMILIES, indirect=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(request, tmp_path_factory):
    """Path of a tiny random checkpoint directory (3 s audio window), built once per family:
    Qwen2-Audio unless parametrised (``both_families``)."""
    from models.tiny import build_tiny_checkpoint

    family = getattr(request, "param", "qwen2_audio")
    return build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}") / "ckpt", family=family, seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from models.loading import load_processor

    return load_processor(tiny_checkpoint)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """A fresh fp32 CPU model per test (tests may change weights or add hooks)."""
    from models.loading import load_model

    return load_model(tiny_checkpoint, dtype=torch.float32).eval()
