"""Shared fixtures: one tiny Qwen2-Audio checkpoint per test session (built in well under a second)."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random Qwen2-Audio checkpoint directory (3 s audio window), built once."""
    from models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_checkpoint):
    from models.loading import load_processor

    return load_processor(tiny_checkpoint)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """A fresh fp32 CPU model per test (tests may change weights or add hooks)."""
    from models.loading import load_model

    return load_model(tiny_checkpoint, dtype=torch.float32).eval()
