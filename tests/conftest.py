"""Shared fixtures: a tiny from-scratch policy directory and a default-shaped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Fixtures of tests/support (importable as `support`: pytest puts tests/ on sys.path):
# tiny_hub / tiny_hub_cache, tiny random models by hub id in a hub-layout cache.
pytest_plugins = ["support.tiny_hub"]

TEXTS = [
    "a great film with a wonderful cast",
    "the plot is dull and the acting is bad",
    "an awful mess of a movie",
    "funny, warm and beautifully shot",
    "i loved every minute of this story",
    "boring, slow and far too long",
    "a charming and delightful comedy",
    "the worst film of the year",
] * 4


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """A 1-layer GPT-2 with a trained byte-level BPE tokenizer, saved with save_pretrained."""
    import torch

    from pipeline_lib.models.loading import build_scratch_policy, save_model, train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, vocab_size=320)
    model = build_scratch_policy(tok, **{"n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 2})
    path = tmp_path_factory.mktemp("policy") / "sft"
    save_model(model, tok, path)
    return path


@pytest.fixture()
def config() -> dict:
    from pipeline_lib.settings.config import validate_config

    cfg = yaml.safe_load((ROOT / "tests/data/tiny.yaml").read_text())
    cfg["device"] = "cpu"
    return validate_config(cfg)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module: the tiny models gain nothing from threads,
    and one keeps the tests fast when other jobs share the CPU. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
