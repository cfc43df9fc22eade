"""Train a tiny model with one trainer, in one process or as a rank of ``accelerate launch``.

    python tests/launch/worker.py ARGS.json                                  # one process
    python -m accelerate.commands.launch --config_file C --num_processes 2 \\
        tests/launch/worker.py ARGS.json                                     # several

ARGS: {"trainer": "preference" | "ppo" | "sft" | "rm", "out": dir, "steps": int, "seed": int,
       "checkpoint_dir": dir | null, "method": "dpo" | ... (preference only),
       "kill_after_checkpoint": step | null (sft, rm: every rank exits with status 3 right after
       the checkpoint of that step, as a killed job would)}.
The main process writes ``out/weights.safetensors`` (the trained policy) and ``out/rows.json``.
Model, tokenizer and data are built deterministically from fixed seeds, so every process and
every run sees the same ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline_lib.settings.sections import RewardModelSettings, SFTSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support/
from support.word_lm import PROMPTS, WORDS  # noqa: E402
from support.word_lm import word_tokenizer as tokenizer  # noqa: E402


def model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # No dropout: SFT and reward-model training run in train() mode, and dropout masks are
    # random draws that differ between one and two processes.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=32,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, summary_first_dropout=0.0)
    return GPT2LMHeadModel(config).eval()


def pairs(tok, policy, n_pairs: int = 11) -> pl.DataFrame:
    """Random best/worst responses with their reference log-probs under ``policy``."""
    from pipeline_lib.models.encoding import encode_prompt
    from pipeline_lib.train.preference_objective import policy_logprobs
    rng = np.random.default_rng(0)
    ids = [tok.convert_tokens_to_ids(w) for w in WORDS]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_pairs)]
    best = [[int(x) for x in rng.choice(ids, size=rng.integers(2, 6))] + [tok.eos_token_id]
            for _ in prompts]
    worst = [[int(x) for x in rng.choice(ids, size=rng.integers(2, 6))] + [tok.eos_token_id]
             for _ in prompts]
    enc = [encode_prompt(tok, p) for p in prompts]
    with torch.no_grad():
        ref_b = policy_logprobs(policy, enc, best, tok.pad_token_id).double().numpy()
        ref_w = policy_logprobs(policy, enc, worst, tok.pad_token_id).double().numpy()
    return pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n_pairs)], "prompt": prompts,
        "best_token_ids": best, "worst_token_ids": worst,
        "best_ref_logprob": ref_b, "worst_ref_logprob": ref_w,
    })


def target_reward(tok, word: str = "c"):
    target = tok.convert_tokens_to_ids(word)

    def reward_fn(idx, texts, ids):
        return np.array([np.mean([t == target for t in r]) for r in ids], dtype=np.float64)

    return reward_fn


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) for _ in range(n)]


def _kill_after_checkpoint(step: int) -> None:
    """Every rank exits (status 3, no cleanup) once the checkpoint of ``step`` is complete."""
    import os

    from pipeline_lib.train import reward_model, sft

    save = sft.save_trainer_checkpoint

    def save_then_die(acc, directory, model, optimizer, scheduler, meta, rows, tokenizer=None):
        path = save(acc, directory, model, optimizer, scheduler, meta, rows, tokenizer)
        if meta["step"] == step:
            os._exit(3)
        return path

    sft.save_trainer_checkpoint = save_then_die
    reward_model.save_trainer_checkpoint = save_then_die


def run(args: dict) -> tuple[list[dict], object]:
    torch.set_num_threads(1)
    tok = tokenizer()
    policy = model(tok)
    common = {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1, "batch_size": 5,
              "max_length": 16, "log_every": 1, "mixed_precision": "no"}
    if args.get("kill_after_checkpoint"):
        _kill_after_checkpoint(int(args["kill_after_checkpoint"]))
    ckpt = {"checkpoint_dir": args.get("checkpoint_dir")}
    if args["trainer"] == "sft":  # 23 texts in batches of 5: the last batch has 3
        from pipeline_lib.train.sft import train_sft

        cfg = SFTSettings(**common, enabled=True, epochs=3, max_steps=args["steps"], eval_every=2,
                          checkpoint_every=2)
        return train_sft(policy, tok, texts(23, 0), texts(7, 1), cfg, "cpu", seed=args["seed"],
                         **ckpt)
    if args["trainer"] == "rm":  # 14 training pairs in batches of 5: the last has 4
        from transformers import GPT2ForSequenceClassification

        from pipeline_lib.train.reward_model import train_reward_model

        torch.manual_seed(0)
        config = policy.config
        config.num_labels = 1
        rm = GPT2ForSequenceClassification(config)
        cfg = RewardModelSettings(**common, seeds=(1,), base="sft", revision=None,
                                  trust_remote_code=False, input="concat", template=None,
                                  pretrained=(), epochs=2, val_fraction=0.2,
                                  center_coef=0.01, checkpoint_every=2)
        return train_reward_model(rm, tok, texts(18, 2), texts(18, 3), cfg, "cpu",
                                  seed=args["seed"], **ckpt)
    if args["trainer"] == "preference":
        from pipeline_lib.train.preference import PreferenceConfig, train_preference

        data = pairs(tok, policy)
        cfg = PreferenceConfig(method=args.get("method", "dpo"), beta=0.1, batch_size=5,
                               lr=1e-3, max_steps=args["steps"], epochs=10, checkpoint_every=2,
                               warmup_steps=1, device="cpu")
        return train_preference(policy, tok, data, cfg, seed=args["seed"],
                                checkpoint_dir=args.get("checkpoint_dir"))
    from pipeline_lib.train.ppo.config import PPOConfig
    from pipeline_lib.train.ppo.trainer import train_ppo

    cfg = PPOConfig(steps=args["steps"], rollout_batch_size=4, minibatch_size=2, ppo_epochs=2,
                    lr=3e-3, kl_coef=0.01, max_new_tokens=6, checkpoint_every=1, device="cpu",
                    sft_weight=args.get("sft_weight", 0.0))
    sft = [([0, 3], [5, 6, 0]), ([0, 4, 5], [7, 0]), ([0, 8], [9, 10, 11, 0])]
    return train_ppo(policy, tok, PROMPTS, target_reward(tok), cfg, seed=args["seed"],
                     checkpoint_dir=args.get("checkpoint_dir"),
                     sft_examples=sft if args.get("sft_weight") else None)


def main() -> None:
    from accelerate import PartialState
    from safetensors.torch import save_file

    args = json.loads(Path(sys.argv[1]).read_text())
    rows, trained = run(args)
    if PartialState().is_main_process:
        out = Path(args["out"])
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in trained.state_dict().items()
                   if k != "lm_head.weight"}, str(out / "weights.safetensors"))  # tied to wte
        (out / "rows.json").write_text(json.dumps(rows))
    from pipeline_lib.train.distributed import exit_launched_process

    exit_launched_process()


if __name__ == "__main__":
    main()
