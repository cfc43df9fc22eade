"""Benchmark: reference-sample generation throughput, HF ``generate`` against vLLM.

Samples M responses for each of P prompts with each backend through the interface the
``sample`` rule uses (``backend.sample`` per prompt group, seeded per group), then computes the
reference log-probs (the HF forward pass both backends share). Prints one row per backend:
sampling time, generated tokens per second, log-prob time, and the speed-up over HF.

    python benchmarks/bench_generation.py                       # a GPT-2-small-sized model
    python benchmarks/bench_generation.py --model results/sentiment/models/sft
    python benchmarks/bench_generation.py --backends hf,vllm --prompts 256 --m 32

Without ``--model``, a randomly initialised GPT-2 (``--layers``/``--width``) and a byte-level BPE
tokenizer trained on the prompts are saved to a temporary directory; random weights rarely emit
EOS, so nearly every response is ``--max-new-tokens`` long, which makes runs comparable.
Target (issue #5): vLLM >= 5x the HF backend's sampling throughput on the same GPU. A backend
that is not installed (vLLM on CPU machines) is reported as such.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import pipeline_lib  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_lib.generation.hf import HFBackend, sequence_logprobs
from pipeline_lib.generation.sampling import SamplingParams, prompt_groups, sample_groups
from pipeline_lib.models.device import pick_device
from pipeline_lib.models.encoding import encode_prompt
from pipeline_lib.models.loading import (
    build_scratch_policy,
    load_causal_lm,
    load_tokenizer,
    save_model,
    train_tokenizer,
)

WORDS = ("the movie was a film with great acting and a plot that never quite works but the cast "
         "is charming funny dull slow brilliant").split()


def prompt_texts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(2 + i % 7)) for i in range(n)]


def scratch_model(directory: Path, layers: int, width: int) -> Path:
    texts = prompt_texts(512) * 4
    tok = train_tokenizer(texts, vocab_size=2048)
    torch.manual_seed(0)
    model = build_scratch_policy(tok, **{"n_positions": 512, "n_layer": layers, "n_embd": width,
                                       "n_head": max(1, width // 64)})
    save_model(model, tok, directory)
    return directory


def make_backend(name: str, model_dir: Path, device, args):
    tok = load_tokenizer(model_dir, "--model")
    model = load_causal_lm(model_dir, device, "--model")
    if name == "hf":
        return HFBackend(model, tok, device)
    from pipeline_lib.generation.vllm import VLLMBackend

    return VLLMBackend(model_dir, tok, model, device, gpu_memory_utilization=args.vllm_memory,
                       dtype=args.vllm_dtype, seed=0)


def run(name: str, model_dir: Path, device, args) -> dict:
    backend = make_backend(name, model_dir, device, args)
    ids = [encode_prompt(backend.tokenizer, t) for t in prompt_texts(args.prompts)]
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0,
                            max_new_tokens=args.max_new_tokens)
    groups = prompt_groups(len(ids), args.m, args.batch_size)
    sample_groups(backend, ids, groups[:1], args.m, params, 1, "warmup")  # compile / allocate
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sampled = sample_groups(backend, ids, groups, args.m, params, 0, "bench")
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_sample = time.perf_counter() - t0
    flat = [(i, r) for i in sorted(sampled) for r in sampled[i]]
    n_tokens = sum(len(r.token_ids) for _, r in flat)
    t0 = time.perf_counter()
    sequence_logprobs(backend.model, [ids[i] for i, _ in flat], [r.token_ids for _, r in flat],
                      backend.tokenizer.pad_token_id, backend.device)
    t_logp = time.perf_counter() - t0
    return {"samples": len(flat), "tokens": n_tokens, "sample_s": t_sample,
            "tok_per_s": n_tokens / t_sample, "logprob_s": t_logp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local HF causal-LM directory (default: a scratch GPT-2)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--m", type=int, default=16, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256,
                    help="samples per generate call (generation.batch_size)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--vllm-memory", type=float, default=0.5)
    ap.add_argument("--vllm-dtype", default="float32",
                    help="vLLM dtype (float32 = the HF backend's precision; bfloat16 is faster)")
    args = ap.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else scratch_model(
            Path(tmp) / "model", args.layers, args.width)
        label = args.model or f"scratch GPT-2 {args.layers}x{args.width}"
        print(f"model: {label}; device: {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f"; {args.prompts} prompts x M = {args.m}, <= {args.max_new_tokens} new tokens")
        print(f"{'backend':8} {'samples':>8} {'tokens':>9} {'sample s':>9} {'tokens/s':>10} "
              f"{'logprob s':>10} {'vs hf':>6}")
        hf_rate = None
        for name in args.backends.split(","):
            try:
                r = run(name, model_dir, device, args)
            except ImportError as exc:
                print(f"{name:8} not available: {str(exc).splitlines()[0]}")
                continue
            if name == "hf":
                hf_rate = r["tok_per_s"]
            ratio = f"{r['tok_per_s'] / hf_rate:6.1f}" if hf_rate else "     -"
            print(f"{name:8} {r['samples']:8d} {r['tokens']:9d} {r['sample_s']:9.2f} "
                  f"{r['tok_per_s']:10.0f} {r['logprob_s']:10.2f} {ratio}")


if __name__ == "__main__":
    main()
