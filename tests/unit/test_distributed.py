"""Pure pieces of multi-process training: batch slicing, global moments, launch settings."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_lib.math.ppo_math import whiten
from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.errors import ConfigError
from pipeline_lib.settings.launch import (
    ACCELERATE_DIR,
    SHIPPED,
    accelerate_config_file,
    read_accelerate_config,
)
from pipeline_lib.stages.common import LAUNCH_ENTRY
from pipeline_lib.train.distributed import global_mean_scale, local_part, rank_slice, whiten_moments
from pipeline_lib.train.launch import launch_command


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (5, 3), (1, 2), (0, 4), (7, 7)])
def test_rank_slices_cover_the_batch_once_in_order(n, world):
    parts = [list(range(n))[rank_slice(n, r, world)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_local_part_gives_an_empty_rank_the_first_item_with_weight_zero():
    import numpy as np

    idx = np.array([7, 3, 5])
    assert [(list(p), w) for p, w in (local_part(idx, r, 2) for r in range(2))] == [
        ([7, 3], 1.0), ([5], 1.0)]
    one = np.array([9])
    assert [(list(p), w) for p, w in (local_part(one, r, 2) for r in range(2))] == [
        ([9], 1.0), ([9], 0.0)]


def test_rank_slice_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        rank_slice(4, 2, 2)


def test_local_sums_scaled_then_averaged_give_the_global_mean():
    """What DDP does to the preference loss: mean over ranks of sum(local) * world / B."""
    values = torch.arange(11, dtype=torch.float64) ** 1.5
    for world in (1, 2, 3, 4):
        per_rank = [values[rank_slice(11, r, world)].sum() * global_mean_scale(11, world)
                    for r in range(world)]
        assert float(sum(per_rank) / world) == pytest.approx(float(values.mean()), rel=1e-12)


def test_whiten_moments_hand_computed():
    # x = 1, 2, 3, 6: mean 3, Bessel variance (4 + 1 + 0 + 9) / 3
    assert whiten_moments(12.0, 50.0, 4) == pytest.approx((3.0, 14 / 3))
    assert whiten_moments(5.0, 25.0, 1) == (5.0, 0.0)
    with pytest.raises(ValueError):
        whiten_moments(0.0, 0.0, 0)


def test_whitening_chunks_with_global_moments_equals_whitening_the_batch():
    """The PPO trainer whitens each rank's advantages with moments summed over ranks."""
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1
    whole = whiten(adv, mask)
    chunks = [slice(0, 3), slice(3, 6)]
    sums = [0.0, 0.0, 0.0]
    for c in chunks:
        am = adv[c] * mask[c]
        for i, v in enumerate((am.sum(), (am * adv[c]).sum(), mask[c].sum())):
            sums[i] += float(v)
    moments = whiten_moments(*sums)
    parts = torch.cat([whiten(adv[c], mask[c], moments=moments) for c in chunks])
    assert torch.allclose(parts, whole, atol=1e-12)
    assert not torch.allclose(whiten(adv[chunks[0]], mask[chunks[0]]), whole[chunks[0]])


def test_shipped_accelerate_configs():
    kinds = {name: read_accelerate_config(accelerate_config_file(name))["distributed_type"]
             for name in SHIPPED}
    assert kinds == {"single": "NO", "ddp": "MULTI_GPU", "zero2": "DEEPSPEED",
                     "zero3": "DEEPSPEED"}
    for stage in (2, 3):
        ds = read_accelerate_config(ACCELERATE_DIR / f"zero{stage}.yaml")["deepspeed_config"]
        assert ds["zero_stage"] == stage and ds["zero3_save_16bit_model"] is True


def test_launch_command_is_an_argument_list_without_a_shell(tmp_path):
    job = tmp_path / "job; rm -rf x.json"  # a path is one argument, never shell text
    cmd = launch_command(ACCELERATE_DIR / "ddp.yaml", 4, 29555, 3, job, LAUNCH_ENTRY)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--main_process_port") + 1] == "29555"
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "3"
    assert cmd[-3:] == ["-m", "pipeline_lib.stages.jobs", str(job)]


@pytest.fixture()
def tiny_config() -> dict:
    root = Path(__file__).resolve().parents[2]
    return yaml.safe_load((root / "tests/data/tiny.yaml").read_text())


def _launch(config: dict, **launch) -> dict:
    config = copy.deepcopy(config)
    config.setdefault("training", {})["launch"] = launch
    return config


def test_launch_defaults_to_one_process(tiny_config):
    cfg = validate_config(copy.deepcopy(tiny_config))
    assert cfg["training"]["launch"] == {"accelerate_config": None, "num_processes": 1}


@pytest.mark.parametrize("launch, message", [
    ({"num_processes": 2}, "accelerate_config is null"),
    ({"accelerate_config": "single", "num_processes": 2}, "runs one process"),
    ({"accelerate_config": "fsdp9"}, "neither one of single"),
    ({"accelerate_config": "ddp", "num_processes": 4},
     "training.ppo.rollout_batch_size (6, run ppo) must be a multiple"),
])
def test_bad_launch_settings_name_the_key(tiny_config, launch, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(_launch(tiny_config, **launch))


def test_launch_with_a_user_accelerate_config_file(tiny_config, tmp_path):
    ok = tmp_path / "mine.yaml"
    ok.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    config = _launch(tiny_config, accelerate_config=str(ok), num_processes=2)
    config["training"]["ppo"] = {**config["training"]["ppo"], "minibatch_size": 2}
    validate_config(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_processes: 8\n")
    with pytest.raises(ConfigError, match="no distributed_type"):
        validate_config(_launch(config, accelerate_config=str(bad), num_processes=2))
