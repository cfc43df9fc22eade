"""PRS with a Hugging Face model: the text generator, reference log-probs and the samples tables
of PRS trees."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import polars as pl

from pipeline_lib.generation.hf import sequence_logprobs
from pipeline_lib.generation.prs import (
    GeneratedText,
    PRSConfig,
    PRSSample,
    RefLogprobFn,
    ScoreFn,
    prs_sample,
)
from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.math.seeding import derive_seed
from pipeline_lib.models.encoding import (
    decode_responses,
    encode_prompt,
    encode_rendered,
    eos_token_ids,
    render_prompt,
)

log = logging.getLogger(__name__)


class HFTextGenerator:
    """:class:`TextGenerator` over :class:`pipeline_lib.generation.hf.HFBackend`.

    With a chat template (``use_chat_template`` and the tokenizer has one) a prompt is rendered
    with ``apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` and encoded
    with ``add_special_tokens=False``; otherwise it is encoded like every pipeline prompt
    (:func:`pipeline_lib.models.encoding.encode_prompt`: BOS + text).

    Prompts longer than the model's context minus ``max_new_tokens`` are cut from the left
    (keeping the end of the template, which holds the instruction to answer) and counted in
    ``n_truncated``; give compact templates to small-context models. ``batch_size`` (sequences
    per ``HFBackend.sample`` call) bounds memory: prompts are processed in fixed chunks, chunk
    k seeded with ``derive_seed(seed, "chunk", first prompt index)``. The backend's sampler
    has no presence penalty (the PRS code used 1.2); temperature / top-k / top-p come from
    ``params``.
    """

    def __init__(
        self,
        backend,
        use_chat_template: bool = True,
        params: SamplingParams | None = None,
        batch_size: int | None = None,
        max_prompt_tokens: int | None = None,
    ):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.use_chat_template = bool(use_chat_template)
        self.params = params or SamplingParams()
        self.batch_size = batch_size
        cfg = getattr(backend.model, "config", None)
        ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self.context = int(max_prompt_tokens) if max_prompt_tokens else ctx
        self.n_truncated = 0

    @property
    def uses_chat_template(self) -> bool:
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def format_prompt(self, text: str) -> str:
        return render_prompt(self.tokenizer, text) if self.uses_chat_template else text

    def encode(self, text: str) -> list[int]:
        return encode_rendered(self.tokenizer, text, self.uses_chat_template)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def _fit(self, ids: list[int], max_new: int) -> list[int]:
        if self.context is None:
            return ids
        limit = self.context - max_new
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new} leaves no room in a {self.context} context")
        if len(ids) > limit:
            self.n_truncated += 1
            log.warning("PRS prompt of %d tokens cut to the last %d", len(ids), limit)
            return ids[-limit:]
        return ids

    def generate(
        self, prompts: list[str], num_samples: int, seed: int, max_new_tokens: int | None = None
    ) -> list[list[GeneratedText]]:
        params = self.params
        if max_new_tokens is not None:
            params = dataclasses.replace(params, max_new_tokens=int(max_new_tokens))
        ids = [self._fit(self.encode(p), params.max_new_tokens) for p in prompts]
        per_chunk = len(ids) if not self.batch_size else max(1, self.batch_size // num_samples)
        tok = self.tokenizer
        eos = eos_token_ids(tok, self.backend.model)
        out: list[list[GeneratedText]] = []
        for start in range(0, len(ids), max(per_chunk, 1)):
            chunk_seed = seed if per_chunk >= len(ids) else derive_seed(seed, "chunk", start)
            batch = self.backend.sample(ids[start : start + per_chunk], num_samples, params,
                                        chunk_seed)
            for responses in batch:
                texts = decode_responses(tok, [r.token_ids for r in responses], eos)
                out.append([GeneratedText(t, list(r.token_ids), bool(r.finished))
                            for t, r in zip(texts, responses, strict=True)])
        return out


def prompt_preferences(prompts: pl.DataFrame) -> list[str | None]:
    """The per-prompt preference column of a prompts table (all None when absent)."""
    if "preference" not in prompts.columns:
        return [None] * prompts.height
    return prompts["preference"].to_list()


def hf_ref_logprob_fn(backend, batch_size: int = 256,
                      params: SamplingParams | None = None) -> RefLogprobFn:
    """log pi_ref(y | x) with x encoded as every pipeline prompt (BOS + instruction), under the
    sampling distribution of ``params`` (``None``: temperature 1). PRS responses are not drawn
    from pi_ref(. | x): under top-p / top-k one may lie outside its support, which is an error
    (the log-prob would be -inf)."""
    tok = backend.tokenizer

    def ref(prompts: list[str], response_ids: list[list[int]]) -> np.ndarray:
        out = sequence_logprobs(backend.model, [encode_prompt(tok, p) for p in prompts],
                                response_ids, tok.pad_token_id, backend.device, batch_size,
                                params=params)
        if not np.all(np.isfinite(out)):
            raise ValueError(
                f"{int((~np.isfinite(out)).sum())} PRS response(s) lie outside pi_ref's top-p/"
                "top-k support, so log pi_ref(y | x) = -inf; use top_p = 1 and top_k = 0")
        return out

    return ref


def prs_samples_table(
    prompts: pl.DataFrame,
    results: Sequence[Sequence[PRSSample]],
    ref_logprob: RefLogprobFn | Sequence[float] | np.ndarray,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(samples table, per-prompt-per-layer PRS table) for ``results`` of :func:`prs_sample`.

    The samples table has exactly the ``samples`` schema columns, ``prompt`` being the original
    instruction, ``strategy='prs'``. ``ref_logprob`` is either a callable
    ``(instructions, response_token_ids) -> array`` (e.g. :func:`hf_ref_logprob_fn`) or the
    precomputed values in row order; it must be log pi_ref(y | original instruction) — PRS
    samples are *not* draws from pi_ref (see the module docstring).

    The second table has one row per (prompt, layer): prompt_id, layer, n_samples,
    parent_idx, parent_score (the conditioning best response, null on layer 0), feedback,
    feedback_tokens (generated), feedback_prompt_tokens, prompt_tokens (the layer's generation
    prompt), response_tokens (sum over the layer). Summing feedback_tokens + response_tokens
    gives all tokens PRS generated.
    """
    if len(results) != prompts.height:
        raise ValueError(f"PRS: {len(results)} results for {prompts.height} prompts")
    ids = prompts["prompt_id"].to_list()
    texts = prompts["prompt"].to_list()
    flat = [(i, s) for i, per in enumerate(results) for s in sorted(per, key=lambda s: s.sample_idx)]
    if callable(ref_logprob):
        ref = ref_logprob([texts[i] for i, _ in flat], [list(s.token_ids) for _, s in flat])
    else:
        ref = ref_logprob
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    if ref.shape != (len(flat),):
        raise ValueError(f"PRS: {ref.shape[0]} ref log-probs for {len(flat)} samples")
    samples = pl.DataFrame(
        {
            "prompt_id": [ids[i] for i, _ in flat],
            "sample_idx": [s.sample_idx for _, s in flat],
            "prompt": [texts[i] for i, _ in flat],
            "response": [s.text for _, s in flat],
            "response_token_ids": [list(s.token_ids) for _, s in flat],
            "n_tokens": [len(s.token_ids) for _, s in flat],
            "finished": [bool(s.finished) for _, s in flat],
            "ref_logprob": ref,
            "strategy": ["prs"] * len(flat),
            "layer": [s.layer for _, s in flat],
            "parent_idx": [s.parent_idx for _, s in flat],
        },
        schema_overrides={"sample_idx": pl.Int32, "response_token_ids": pl.List(pl.Int32),
                          "n_tokens": pl.Int32, "layer": pl.Int8, "parent_idx": pl.Int32},
    )

    rows: dict[str, list] = {k: [] for k in (
        "prompt_id", "layer", "n_samples", "parent_idx", "parent_score", "feedback",
        "feedback_tokens", "feedback_prompt_tokens", "prompt_tokens", "response_tokens")}
    for i, per in enumerate(results):
        by_idx = {s.sample_idx: s for s in per}
        for layer in sorted({s.layer for s in per}):
            group = [s for s in per if s.layer == layer]
            first = min(group, key=lambda s: s.sample_idx)
            parent = by_idx.get(first.parent_idx)
            rows["prompt_id"].append(ids[i])
            rows["layer"].append(layer)
            rows["n_samples"].append(len(group))
            rows["parent_idx"].append(first.parent_idx)
            rows["parent_score"].append(None if parent is None else parent.score)
            rows["feedback"].append(first.feedback)
            rows["feedback_tokens"].append(sum(s.extra_tokens for s in group))
            rows["feedback_prompt_tokens"].append(first.feedback_prompt_tokens)
            rows["prompt_tokens"].append(first.prompt_tokens)
            rows["response_tokens"].append(sum(len(s.token_ids) for s in group))
    layers = pl.DataFrame(rows, schema={
        "prompt_id": pl.String, "layer": pl.Int8, "n_samples": pl.Int32, "parent_idx": pl.Int32,
        "parent_score": pl.Float64, "feedback": pl.String, "feedback_tokens": pl.Int64,
        "feedback_prompt_tokens": pl.Int64, "prompt_tokens": pl.Int64,
        "response_tokens": pl.Int64,
    })
    return samples, layers


def generate_prs_table(
    backend,
    prompts: pl.DataFrame,
    cfg: PRSConfig,
    params: SamplingParams,
    score_fn: ScoreFn,
    seed: int,
    batch_size: int | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """PRS for every prompt of a prompts table with an :class:`HFBackend`: the two tables of
    :func:`prs_samples_table`, ``ref_logprob`` from the backend's model (= pi_ref) under the
    sampling distribution of ``params``."""
    gen = HFTextGenerator(backend, cfg.use_chat_template, params=params, batch_size=batch_size)
    results = prs_sample(gen, score_fn, prompts["prompt"].to_list(), prompt_preferences(prompts),
                         cfg, seed)
    return prs_samples_table(prompts, results, hf_ref_logprob_fn(backend, params=params))
