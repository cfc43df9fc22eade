"""The trainers under ``accelerate launch`` with the shipped configs, as several CPU processes.

DDP runs on CPU through the same ``config/accelerate/ddp.yaml`` that multi-GPU jobs use (gloo
instead of NCCL); ZeRO-2/3 run on DeepSpeed's CPU accelerator (gloo). Each launch is real:
two processes, a process group, gradient all-reduce or ZeRO partitioning.

* The preference, SFT and reward-model trainers split each global batch over the ranks, so two
  processes must train the same weights as one (up to float summation order), also when a
  batch leaves a rank without pairs (11 pairs, batch 5: the last batch has one pair) or splits
  unevenly. The SFT and reward-model runs in two processes are killed after a checkpoint and
  resumed on the way.
* PPO cannot match one process (each rank samples its own responses), so its test is that a
  run killed after a checkpoint and resumed under the same launch ends exactly where an
  uninterrupted run ends: per-rank RNG states, optimizer (shards under ZeRO) and weights
  (gathered under ZeRO-3) all come back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline_lib.settings.launch import ACCELERATE_DIR
from pipeline_lib.train.launch import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "launch" / "worker.py"
pytestmark = pytest.mark.slow  # some 27 two-process launches: minutes
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed "
                                     "(bash setup.sh installs it)")
CONFIGS = ["ddp", pytest.param("zero2", marks=needs_deepspeed),
           pytest.param("zero3", marks=needs_deepspeed)]


def launch(config: str, args: dict, tmp_path: Path, processes: int = 2) -> dict:
    """Run the worker under ``accelerate launch`` with a shipped config; its outputs."""
    args_file = tmp_path / f"args-{len(list(tmp_path.iterdir()))}.json"
    args_file.write_text(json.dumps(args))
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_DIR / f"{config}.yaml"),
           "--num_processes", str(processes), "--num_machines", "1",
           "--main_process_port", str(free_port()), "--num_cpu_threads_per_process", "1",
           str(WORKER), str(args_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return outputs(Path(args["out"]))


def in_process(args: dict) -> dict:
    """The same worker in one process (run in a subprocess, as a fresh interpreter)."""
    args_file = Path(args["out"]).with_suffix(".json")
    args_file.parent.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps(args))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, str(WORKER), str(args_file)], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return outputs(Path(args["out"]))


def outputs(out: Path) -> dict:
    return {"weights": load_file(str(out / "weights.safetensors")),
            "rows": json.loads((out / "rows.json").read_text())}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("config", CONFIGS)
def test_preference_in_two_processes_trains_what_one_process_trains(config, tmp_path):
    steps = 5  # 11 pairs in batches of 5: steps 3 and 5 leave rank 1 without a pair
    one = in_process({"trainer": "preference", "out": str(tmp_path / "one"), "steps": steps,
                      "seed": 3})
    two = launch(config, {"trainer": "preference", "out": str(tmp_path / "two"), "steps": steps,
                          "seed": 3, "checkpoint_dir": str(tmp_path / "ckpt")}, tmp_path)
    other_seed = in_process({"trainer": "preference", "out": str(tmp_path / "other"),
                             "steps": steps, "seed": 4})
    moved = max_diff(one["weights"], other_seed["weights"])
    assert moved > 1e-3  # the data order matters, so the comparison below can fail
    assert max_diff(one["weights"], two["weights"]) < 1e-5
    assert [r["step"] for r in two["rows"]] == list(range(1, steps + 1))
    for a, b in zip(one["rows"], two["rows"], strict=True):  # logged over all ranks
        for key in ("loss", "reward_margin", "accuracy", "chosen_logp", "tokens", "pairs",
                    "lr", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    assert (tmp_path / "ckpt" / "last" / "state.json").exists()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("trainer, keys", [
    ("sft", ("loss", "lr", "tokens")),
    ("rm", ("loss", "accuracy", "lr")),
])
def test_sft_and_reward_models_in_two_processes_train_what_one_process_trains(
        config, trainer, keys, tmp_path):
    """The two-process run is also killed after its step-2 checkpoint and resumed."""
    steps = 5
    one = in_process({"trainer": trainer, "out": str(tmp_path / "one"), "steps": steps,
                      "seed": 3})
    args = {"trainer": trainer, "out": str(tmp_path / "two"), "steps": steps, "seed": 3,
            "checkpoint_dir": str(tmp_path / "ckpt")}
    with pytest.raises(AssertionError, match=r"launch failed \(\d+\)"):
        launch(config, {**args, "kill_after_checkpoint": 2}, tmp_path)
    assert json.loads((tmp_path / "ckpt/last/state.json").read_text())["step"] == 2
    if config.startswith("zero"):
        assert len(list((tmp_path / "ckpt/last").glob("optimizer-rank*.pt"))) == 2
    saved = json.loads((tmp_path / "ckpt/last/log_rows.json").read_text())
    two = launch(config, args, tmp_path)
    assert two["rows"][: len(saved)] == saved  # restored (elapsed_s too): it resumed
    other_seed = in_process({"trainer": trainer, "out": str(tmp_path / "other"),
                             "steps": steps, "seed": 4})
    assert max_diff(one["weights"], other_seed["weights"]) > 1e-3
    assert max_diff(one["weights"], two["weights"]) < 1e-5
    assert [(r["step"], r["split"]) for r in one["rows"]] == [
        (r["step"], r["split"]) for r in two["rows"]]
    for a, b in zip(one["rows"], two["rows"], strict=True):
        for key in keys:
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (key, a["step"])


@pytest.mark.parametrize("config", CONFIGS)
def test_ppo_in_two_processes_resumes_exactly(config, tmp_path):
    base = {"trainer": "ppo", "seed": 1, "sft_weight": 0.5}  # BOND's two terms
    full = launch(config, {**base, "out": str(tmp_path / "full"), "steps": 3,
                           "checkpoint_dir": str(tmp_path / "ckpt-full")}, tmp_path)
    launch(config, {**base, "out": str(tmp_path / "part"), "steps": 2,
                    "checkpoint_dir": str(tmp_path / "ckpt")}, tmp_path)
    state = json.loads((tmp_path / "ckpt/last/trainer_state.json").read_text())
    assert state["step"] == 2
    rng = torch.load(tmp_path / "ckpt/last/rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["cpu"],
                                                      rng["ranks"][1]["cpu"])
    if config.startswith("zero"):
        assert {p.name for p in (tmp_path / "ckpt/last").glob("optimizer-rank*.pt")} == {
            "optimizer-rank0.pt", "optimizer-rank1.pt"}
    resumed = launch(config, {**base, "out": str(tmp_path / "resumed"), "steps": 3,
                              "checkpoint_dir": str(tmp_path / "ckpt")}, tmp_path)
    assert max_diff(full["weights"], resumed["weights"]) < 1e-6
    assert [r["step"] for r in full["rows"]] == [1, 2, 3]
    for a, b in zip(full["rows"], resumed["rows"], strict=True):
        assert b["reward"] == pytest.approx(a["reward"]) and b["loss"] == pytest.approx(a["loss"])
    sft = load_file(str(next((tmp_path / "ckpt-full/last/policy").glob("*.safetensors"))))
    assert max_diff({k: v for k, v in sft.items() if k in full["weights"]},
                    {k: full["weights"][k] for k in sft if k in full["weights"]}) < 1e-6
