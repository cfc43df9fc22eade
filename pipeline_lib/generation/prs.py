"""Preference-guided reflective sampling (PRS) as a sampling strategy for the samples cache.

PRS draws the N responses of a prompt as a shallow tree instead of N independent draws
(docs/METHODS.md, "PRS"). With the default two layers of width N/2:

1. layer 0: sample ``widths[0]`` responses y ~ p(. | x, z) from the first-layer prompt
   (instruction x, a blank line, preference z);
2. score them with the reward model and take the best y*;
3. ask the model for *one* feedback f on how well y* meets z ("impartial judge" template);
4. layer 1: sample ``widths[1]`` revisions y ~ p(. | x, z, y*, f) ("corrector" template);
5. return all N responses with their scores (best-of-N then takes the best).

With more layers the step repeats: the best response over *all* previous layers and a fresh
feedback on it condition the next layer. Ties in the score go to the lowest ``sample_idx``.

The tree logic (:func:`prs_sample`) only talks to two small interfaces, so it is tested with a
deterministic fake model:

* a :class:`TextGenerator` (``generate`` / ``format_prompt`` / ``count_tokens``);
  :class:`HFTextGenerator` adapts :class:`pipeline_lib.generation.hf.HFBackend`;
* a scorer: any callable ``score(prompts, responses) -> np.ndarray``. It receives the
  *original* instruction x (not the PRS-augmented prompt), as the pipeline's reward tables do.

Every model call is batched across all prompts: one ``generate`` call per layer and one per
refinement step for all the feedbacks. Seeds are derived per layer and purpose with
``derive_seed(seed, "prs", layer, "sample" | "feedback")``.

Token accounting (exact): a response's generated tokens are ``len(token_ids)`` (incl. a
final EOS, as ``n_tokens`` in the samples table). The feedback that conditions layer l >= 1 is
generated once per prompt; its ``len(token_ids)`` is put in ``extra_tokens`` of the *first*
sample (lowest ``sample_idx``) of layer l and 0 on every other sample. Hence, per prompt::

    total generated tokens = sum(len(s.token_ids) + s.extra_tokens for s in samples)

(:func:`generated_tokens`). Prompt-side (prefill) costs are in ``prompt_tokens`` (the
sample's generation prompt) and ``feedback_prompt_tokens`` (the feedback request that
conditioned its layer, identical on every sample of the layer; sum it once per layer).

PRS samples are **not** draws from pi_ref(. | x): layers >= 1 are conditioned on (x, z, y*,
f), and even layer 0 on (x, z). The samples table's ``ref_logprob`` is still log pi_ref(y | x)
of the response given the *original* instruction with the pipeline's plain prompt encoding
(as for random samples), so KL-style quantities stay comparable, but analytic best-of-N KL
formulas that assume i.i.d. reference draws do not hold for PRS pools.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from pipeline_lib.math.seeding import derive_seed

DEFAULT_PREFERENCE = (
    "I prefer responses that are informative, precise, creative, detailed, relevant, "
    "and in-depth."
)


# Paraphrases of the templates described in the PRS paper / README (not copied code).
DEFAULT_FEEDBACK_TEMPLATE = (
    "Act as an impartial judge. Read the user's question and the answer given below, and "
    "assess how well the answer satisfies the user's stated preference. Give short, concrete "
    "suggestions on how the answer could better meet that preference; do not rewrite it.\n\n"
    "### Question\n{question}\n\n"
    "### Answer\n{answer}\n\n"
    "### Preference\n{preference}\n\n"
    "### Feedback\n"
)


DEFAULT_REFINE_TEMPLATE = (
    "Act as a corrector. Below are a user's question, an earlier answer to it, feedback on "
    "that answer, and the user's preference. Write an improved answer that follows the "
    "feedback and meets the preference better. Reply with the new answer only.\n\n"
    "### Question\n{question}\n\n"
    "### Earlier answer\n{answer}\n\n"
    "### Feedback\n{feedback}\n\n"
    "### Preference\n{preference}\n\n"
    "### Improved answer\n"
)


_SLOTS = {
    "first_template": ({"instruction"}, {"instruction", "preference"}),
    "feedback_template": ({"answer"}, {"question", "answer", "preference"}),
    "refine_template": ({"answer", "feedback"}, {"question", "answer", "feedback", "preference"}),
}


def _template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


@dataclass(frozen=True)
class PRSConfig:
    """Tree shape and prompt templates of PRS.

    Templates are ``str.format`` strings (write literal braces as ``{{ }}``):
    ``first_template`` needs ``{instruction}`` (``{preference}`` optional), ``feedback_template``
    needs ``{answer}`` (``{question}``, ``{preference}`` optional) and ``refine_template`` needs
    ``{answer}`` and ``{feedback}`` (``{question}``, ``{preference}`` optional).
    """

    n: int  # total samples N per prompt
    layers: int = 2  # tree depth
    widths: tuple[int, ...] | None = None  # samples per layer; default N split evenly
    preference: str = DEFAULT_PREFERENCE
    first_template: str = "{instruction}\n\n{preference}"
    feedback_template: str = DEFAULT_FEEDBACK_TEMPLATE
    refine_template: str = DEFAULT_REFINE_TEMPLATE
    feedback_max_new_tokens: int = 64
    use_chat_template: bool = True  # format prompts with the tokenizer's chat template, if any

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"PRS: n must be >= 1, got {self.n}")
        if int(self.layers) < 1:
            raise ValueError(f"PRS: layers must be >= 1, got {self.layers}")
        if self.widths is None:
            if self.n % self.layers:
                raise ValueError(
                    f"PRS: n={self.n} cannot be split evenly into {self.layers} layers; "
                    f"give widths explicitly (summing to {self.n})"
                )
            widths = (self.n // self.layers,) * self.layers
        else:
            widths = tuple(int(w) for w in self.widths)
        if len(widths) != self.layers:
            raise ValueError(f"PRS: {len(widths)} widths {widths} for {self.layers} layers")
        if any(w < 1 for w in widths):
            raise ValueError(f"PRS: every layer width must be >= 1, got {widths}")
        if sum(widths) != self.n:
            raise ValueError(f"PRS: widths {widths} sum to {sum(widths)}, not n={self.n}")
        object.__setattr__(self, "widths", widths)
        if self.feedback_max_new_tokens < 1:
            raise ValueError("PRS: feedback_max_new_tokens must be >= 1")
        for name, (required, allowed) in _SLOTS.items():
            fields = _template_fields(getattr(self, name))
            if missing := required - fields:
                raise ValueError(f"PRS: {name} lacks slot(s) {sorted(missing)}")
            if unknown := fields - allowed:
                raise ValueError(
                    f"PRS: {name} has unknown slot(s) {sorted(unknown)}; allowed {sorted(allowed)}"
                )

    @property
    def layer_starts(self) -> tuple[int, ...]:
        """sample_idx of the first sample of each layer."""
        return tuple(int(s) for s in np.cumsum((0, *self.widths[:-1])))


@dataclass
class GeneratedText:
    """One generated text with its token ids and the tokens spent on it."""

    text: str  # decoded continuation (EOS / special tokens removed)
    token_ids: list[int]  # generated ids, including the final EOS when finished
    finished: bool


@runtime_checkable
class TextGenerator(Protocol):
    def generate(
        self, prompts: list[str], num_samples: int, seed: int, max_new_tokens: int | None = None
    ) -> list[list[GeneratedText]]:
        """``num_samples`` continuations of every prompt (prompts are already formatted)."""
        ...

    def format_prompt(self, text: str) -> str:
        """The model-ready prompt text (chat template applied, or the text unchanged)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens the model would read for the (formatted) prompt ``text``."""
        ...


ScoreFn = Callable[[list[str], list[str]], np.ndarray]


@dataclass
class PRSSample:
    """One sample of a PRS tree: its text and tokens, layer, parent, score and extra tokens."""

    sample_idx: int  # 0..N-1 within the prompt, layer 0 first
    layer: int  # 0-based
    parent_idx: int  # sample_idx of the best earlier response it refines; -1 on layer 0
    text: str
    token_ids: list[int]
    finished: bool
    score: float
    gen_prompt: str  # exact (formatted) prompt text the sample was generated from
    feedback: str | None = None  # the feedback it was conditioned on; None on layer 0
    extra_tokens: int = 0  # feedback tokens, counted once on the first sample of the layer
    prompt_tokens: int = 0  # tokens of gen_prompt
    feedback_prompt_tokens: int = 0  # tokens of the feedback request for this layer (per layer)


def generated_tokens(samples: Sequence[PRSSample]) -> int:
    """All tokens PRS generated for one prompt: responses plus feedbacks."""
    return sum(len(s.token_ids) + s.extra_tokens for s in samples)


def _scores(score_fn: ScoreFn, prompts: list[str], responses: list[str]) -> np.ndarray:
    scores = np.asarray(score_fn(prompts, responses), dtype=np.float64).reshape(-1)
    if scores.shape != (len(responses),):
        raise ValueError(f"PRS scorer returned {scores.shape[0]} scores for {len(responses)}")
    if not np.isfinite(scores).all():
        raise ValueError("PRS scorer returned non-finite scores")
    return scores


def _generate(generator: TextGenerator, prompts: list[str], k: int, seed: int,
              max_new_tokens: int | None, what: str) -> list[list[GeneratedText]]:
    if max_new_tokens is None:
        out = generator.generate(prompts, k, seed)
    else:
        out = generator.generate(prompts, k, seed, max_new_tokens=max_new_tokens)
    if len(out) != len(prompts) or any(len(o) != k for o in out):
        raise ValueError(f"PRS {what}: generator returned the wrong number of outputs")
    return out


def best_sample(samples: Sequence[PRSSample]) -> PRSSample:
    """Highest score; ties go to the lowest sample_idx."""
    return min(samples, key=lambda s: (-s.score, s.sample_idx))


def prs_sample(
    generator: TextGenerator,
    score_fn: ScoreFn,
    instructions: Sequence[str],
    preferences: Sequence[str | None] | None,
    cfg: PRSConfig,
    seed: int,
) -> list[list[PRSSample]]:
    """N = ``cfg.n`` PRS samples per instruction, ordered by sample_idx (layer 0 first).

    ``preferences[i]`` (None → ``cfg.preference``) is the user preference z of prompt i.
    Scores come from ``score_fn(instructions, responses)``.
    """
    instructions = list(instructions)
    n_prompts = len(instructions)
    if preferences is None:
        preferences = [None] * n_prompts
    if len(preferences) != n_prompts:
        raise ValueError(f"PRS: {len(preferences)} preferences for {n_prompts} instructions")
    if not cfg.use_chat_template and getattr(generator, "uses_chat_template", False):
        raise ValueError("PRS: cfg.use_chat_template is False but the generator applies a "
                         "chat template; build it with use_chat_template=False")
    if n_prompts == 0:
        return []
    prefs = [cfg.preference if p is None else str(p) for p in preferences]
    fmt = generator.format_prompt if cfg.use_chat_template else (lambda t: t)
    results: list[list[PRSSample]] = [[] for _ in range(n_prompts)]
    starts = cfg.layer_starts

    for layer, width in enumerate(cfg.widths):
        feedbacks: list[str | None] = [None] * n_prompts
        fb_tokens = [0] * n_prompts
        fb_prompt_tokens = [0] * n_prompts
        parents = [-1] * n_prompts
        if layer == 0:
            gen_prompts = [fmt(cfg.first_template.format(instruction=x, preference=z))
                           for x, z in zip(instructions, prefs, strict=True)]
        else:
            best = [best_sample(r) for r in results]
            parents = [b.sample_idx for b in best]
            fb_prompts = [fmt(cfg.feedback_template.format(question=x, answer=b.text,
                                                           preference=z))
                          for x, b, z in zip(instructions, best, prefs, strict=True)]
            fb = _generate(generator, fb_prompts, 1, derive_seed(seed, "prs", layer, "feedback"),
                           cfg.feedback_max_new_tokens, f"feedback for layer {layer}")
            feedbacks = [f[0].text for f in fb]
            fb_tokens = [len(f[0].token_ids) for f in fb]
            fb_prompt_tokens = [generator.count_tokens(p) for p in fb_prompts]
            gen_prompts = [fmt(cfg.refine_template.format(question=x, answer=b.text, feedback=f,
                                                          preference=z))
                           for x, b, f, z in zip(instructions, best, feedbacks, prefs,
                                                 strict=True)]
        outs = _generate(generator, gen_prompts, width, derive_seed(seed, "prs", layer, "sample"),
                         None, f"layer {layer}")
        scores = _scores(score_fn, [x for x in instructions for _ in range(width)],
                         [o.text for per in outs for o in per]).reshape(n_prompts, width)
        for i, per in enumerate(outs):
            p_tokens = generator.count_tokens(gen_prompts[i])
            for j, o in enumerate(per):
                results[i].append(PRSSample(
                    sample_idx=starts[layer] + j, layer=layer, parent_idx=parents[i],
                    text=o.text, token_ids=list(o.token_ids), finished=bool(o.finished),
                    score=float(scores[i, j]), gen_prompt=gen_prompts[i],
                    feedback=feedbacks[i], extra_tokens=fb_tokens[i] if j == 0 else 0,
                    prompt_tokens=p_tokens, feedback_prompt_tokens=fb_prompt_tokens[i],
                ))
    return results


RefLogprobFn = Callable[[list[str], list[list[int]]], np.ndarray]
