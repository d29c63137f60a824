import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread (before torch is imported; subprocesses inherit it): the test models
# are tiny, and with other processes on the cores OpenMP's spinning threads made their
# matmuls ~30x slower (measured: a live scoring run 16 s -> 0.5 s). Override by exporting it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "ouro-parity" / "tiny_mha"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURE / "expected.pt").is_file():
        pytest.skip(f"parity fixture not found at {FIXTURE} (it ships in ../shared/fixtures)")
    return FIXTURE


@pytest.fixture(scope="session")
def expected(fixture_dir):
    import torch

    return torch.load(fixture_dir / "expected.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny_config():
    from ouro_lab.model import OuroConfig

    return OuroConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, total_ut_steps=4,
                      rope_theta=10000.0, max_position_embeddings=128)
