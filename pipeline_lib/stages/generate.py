"""Generation wiring shared by the sampling stages: the backend a config names, and samples
tables with reference log-probs (random sampling or PRS trees)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from pipeline_lib.generation.hf import HFBackend, sequence_logprobs
from pipeline_lib.generation.prs import PRSConfig
from pipeline_lib.generation.prs_tables import generate_prs_table
from pipeline_lib.generation.sampling import (
    SamplingParams,
    prompt_groups,
    sample_groups,
)
from pipeline_lib.generation.vllm import VLLMBackend
from pipeline_lib.io.atomic import PathLike
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.encoding import (
    apply_chat_setting,
    decode_responses,
    encode_prompt,
    eos_token_ids,
)
from pipeline_lib.models.loading import (
    load_causal_lm,
    load_tokenizer,
)
from pipeline_lib.settings.sections import GenerationSettings, ModelRef, PRSSettings, Settings
from pipeline_lib.stages.common import StageError

log = logging.getLogger("pipeline")

LOGPROB_ROWS = 256  # rows per reference log-prob forward batch (and per written part)


def sampling_params(g: GenerationSettings) -> SamplingParams:
    """The sampling parameters of the ``generation`` section."""
    return SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                          max_new_tokens=g.max_new_tokens)


def sampling_columns(s: Settings) -> dict[str, float | int]:
    """The summary's record of the sampling distribution that π and π_ref — and so every KL
    of the row — refer to: ``generation``'s temperature, top_p and top_k."""
    g = s.generation
    return {"temperature": float(g.temperature), "top_p": float(g.top_p), "top_k": int(g.top_k)}


PolicySource = PathLike | ModelRef


def policy_source(s: Settings, policy_dir: PathLike | None) -> PolicySource:
    """Where a policy is loaded from: the directory a rule hands over (the SFT model or a
    trained policy), or π_ref by name (``policy.base``) when ``sft.enabled`` is false."""
    if isinstance(policy_dir, ModelRef):
        return policy_dir
    if policy_dir is not None:  # derived from pi_ref: its code is pi_ref's
        return ModelRef(str(policy_dir), None, s.policy.trust_remote_code, "policy")
    if s.sft.enabled or s.policy.base == "scratch":
        raise StageError("no policy directory was given and sft.enabled is true: the rule must "
                         "pass the SFT model")
    return s.policy.ref


def load_policy_tokenizer(s: Settings, source: PolicySource):
    """A policy's tokenizer with ``policy.chat_template`` applied (so every stage encodes
    prompts alike: :func:`pipeline_lib.models.encoding.encode_prompt`)."""
    return apply_chat_setting(load_tokenizer(source, "policy"), s.policy.chat_template)


def load_policy(s: Settings, source: PolicySource, device) -> tuple:
    """(tokenizer, causal LM in eval mode) of a policy (see :func:`policy_source`)."""
    return load_policy_tokenizer(s, source), load_causal_lm(source, device, "policy")


def make_backend(s: Settings, policy_dir: PathLike | ModelRef | None, device,
                 g: GenerationSettings | None = None, policy: bool = True):
    """The generation backend ``generation.backend`` names, serving the policy in
    ``policy_dir`` (π_ref by name when it is None and SFT is off); ``g`` overrides the
    generation section. ``policy`` false: another model (the PRS comparison's), whose
    tokenizer keeps its own chat template (``policy.chat_template`` is for policies)."""
    g = s.generation if g is None else g
    backend, seed = g.backend, s.seed
    source = policy_source(s, policy_dir)
    if policy:
        tokenizer, model = load_policy(s, source, device)
    else:
        tokenizer, model = load_tokenizer(source, "model"), load_causal_lm(source, device, "model")
    if backend == "hf":
        return HFBackend(model, tokenizer, device)
    if backend == "vllm":
        from pipeline_lib.models.hub import resolve_model

        v = g.vllm
        path = resolve_model(source).path
        return VLLMBackend(path, tokenizer, model, device,
                           tensor_parallel_size=v.tensor_parallel_size,
                           gpu_memory_utilization=v.gpu_memory_utilization, dtype=v.dtype,
                           seed=seed)
    raise StageError(f"config key generation.backend: unknown backend {backend!r}")


def generate_table(
    backend,
    prompts: pl.DataFrame,
    indices: Sequence[int] | None,
    m: int,
    g: GenerationSettings,
    seed: int,
    split: str,
) -> pl.DataFrame:
    """Sample ``m`` responses for the prompts of the groups covering ``indices`` (groups of
    ``g.batch_size`` sequences, seeded from ``seed`` and ``split``); returns rows of the
    ``samples`` schema with the log-probs of the backend's model under the sampling
    distribution of ``g`` (the reference log-probs when the model is π_ref). The rows of
    :func:`generate_parts`, concatenated."""
    parts = list(generate_parts(backend, prompts, indices, m, g, seed, split))
    return pl.concat(parts) if parts else _samples_frame([], [], [], [], [], [])


def generate_parts(
    backend,
    prompts: pl.DataFrame,
    indices: Sequence[int] | None,
    m: int,
    g: GenerationSettings,
    seed: int,
    split: str,
) -> Iterator[pl.DataFrame]:
    """:func:`generate_table` in parts of LOGPROB_ROWS rows, in prompt order, so memory holds
    one prompt group and one part at a time. Each group is sampled with its own seed, and the
    reference log-probs are computed over the same windows of rows as for the whole table, so
    the parts concatenate to exactly the table :func:`generate_table` returns."""
    tok = backend.tokenizer
    prompt_texts = prompts["prompt"].to_list()
    prompt_ids = [encode_prompt(tok, t) for t in prompt_texts]
    groups = prompt_groups(len(prompt_ids), m, g.batch_size)
    if indices is not None:
        wanted = set(indices)
        groups = [grp for grp in groups if grp.start in wanted]
    params = sampling_params(g)
    ids = prompts["prompt_id"].to_list()
    eos = eos_token_ids(tok, backend.model)
    bar = tqdm(total=sum(len(grp) for grp in groups), desc=f"sample {split}", unit="prompt",
               mininterval=2.0)
    pending: list[tuple[int, int, Any]] = []

    def part(rows: list[tuple[int, int, Any]]) -> pl.DataFrame:
        # log-probs under the distribution that drew them (temperature, top-p, top-k), one
        # forward batch per LOGPROB_ROWS rows of the shard, as when the shard is scored whole
        ref = sequence_logprobs(backend.model, [prompt_ids[i] for i, _, _ in rows],
                                [r.token_ids for _, _, r in rows], tok.pad_token_id,
                                backend.device, params=params, keep_tokens=True,
                                batch_size=LOGPROB_ROWS)
        return _samples_frame([ids[i] for i, _, _ in rows], [j for _, j, _ in rows],
                              [prompt_texts[i] for i, _, _ in rows], [r for _, _, r in rows],
                              ref, decode_responses(tok, [r.token_ids for _, _, r in rows], eos))

    for grp in groups:
        sampled = sample_groups(backend, prompt_ids, [grp], m, params, seed, split, progress=False)
        pending += [(i, j, r) for i in sorted(sampled) for j, r in enumerate(sampled[i])]
        bar.update(len(grp))
        while len(pending) >= LOGPROB_ROWS:
            yield part(pending[:LOGPROB_ROWS])
            pending = pending[LOGPROB_ROWS:]
    if pending:
        yield part(pending)
    bar.close()


def _samples_frame(prompt_ids: list[str], sample_idx: list[int], prompts: list[str],
                   responses: list, ref_logprob, texts: list[str]) -> pl.DataFrame:
    """Rows of the ``samples`` schema for random (i.i.d.) samples."""
    n = len(responses)
    return pl.DataFrame(
        {
            "prompt_id": prompt_ids,
            "sample_idx": sample_idx,
            "prompt": prompts,
            "response": texts,
            "response_token_ids": [r.token_ids for r in responses],
            "n_tokens": [len(r.token_ids) for r in responses],
            "finished": [r.finished for r in responses],
            "ref_logprob": list(ref_logprob),
            "strategy": ["random"] * n,
            "layer": [0] * n,
            "parent_idx": [-1] * n,
        },
        schema_overrides={"prompt_id": pl.String, "sample_idx": pl.Int64, "prompt": pl.String,
                          "response": pl.String, "response_token_ids": pl.List(pl.Int32),
                          "n_tokens": pl.Int64, "finished": pl.Boolean,
                          "ref_logprob": pl.Float64, "strategy": pl.String, "layer": pl.Int64,
                          "parent_idx": pl.Int64},
    )


def prs_config(p: PRSSettings, n: int, layers: int | None = None,
               preference: str | None = None) -> PRSConfig:
    """PRSConfig for N samples from the config's `prs` section (null keys keep defaults)."""
    kw = {k: getattr(p, k) for k in ("first_template", "feedback_template", "refine_template",
                                     "preference") if getattr(p, k) is not None}
    if preference is not None:
        kw["preference"] = preference
    n_layers = p.layers if layers is None else layers
    widths = tuple(p.widths) if p.widths and layers is None else None
    if widths is None and n % n_layers:
        # N/2 + N/2 by default; an odd N puts the extra sample in the first layer
        base = n // n_layers
        widths = tuple(base + (1 if i < n % n_layers else 0) for i in range(n_layers))
    return PRSConfig(n=n, layers=n_layers, widths=widths,
                     feedback_max_new_tokens=p.feedback_max_new_tokens,
                     use_chat_template=p.use_chat_template, **kw)


def prs_cache_table(backend, prompts: pl.DataFrame, m: int, s: Settings,
                    split: str, score_fn) -> pl.DataFrame:
    """The `sample` stage's PRS strategy: an M-sample tree per prompt, guided by ``score_fn``."""
    g = s.generation
    samples, layers = generate_prs_table(backend, prompts, prs_config(s.prs, m),
                                         sampling_params(g), score_fn,
                                         derive_seed(s.seed, "prs", split),
                                         batch_size=g.batch_size)
    log.info("PRS %s: %d samples, %d feedback tokens", split, samples.height,
             int(layers["feedback_tokens"].sum()))
    return samples
