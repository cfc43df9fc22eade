"""PRS tree logic with a deterministic fake model, plus one end-to-end run on a tiny GPT-2."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest

from pipeline_lib.generation.prs import (
    DEFAULT_PREFERENCE,
    GeneratedText,
    PRSConfig,
    TextGenerator,
    generated_tokens,
    prs_sample,
)
from pipeline_lib.generation.prs_tables import (
    HFTextGenerator,
    generate_prs_table,
    prs_samples_table,
)
from pipeline_lib.io.schemas import SCHEMAS
from pipeline_lib.io.tables import conform
from pipeline_lib.math.seeding import derive_seed

INSTRUCTIONS = ["a great film", "the plot is", "boring and", "i loved", "funny, warm"]


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class FakeGenerator:
    """Outputs encode their input: text = '<kind>-<hash(prompt)>-<seed>-<j>'; lengths hashed.

    A call with ``max_new_tokens`` set is a feedback request (PRS passes it only there)."""

    def __init__(self, chat: bool = True):
        self.calls: list[dict] = []
        self.chat = chat
        self.uses_chat_template = chat

    def format_prompt(self, text: str) -> str:
        return f"<user>{text}</user>" if self.chat else text

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @staticmethod
    def output(prompt: str, j: int, feedback: bool, seed: int) -> GeneratedText:
        kind = "fb" if feedback else "resp"
        n = 1 + int(h(f"{prompt}#{j}#{kind}#{seed}"), 16) % 7
        return GeneratedText(f"{kind}-{h(prompt)}-{seed}-{j}", list(range(100, 100 + n)),
                             n % 2 == 0)

    def generate(self, prompts, num_samples, seed, max_new_tokens=None):
        self.calls.append({"prompts": list(prompts), "k": num_samples, "seed": seed,
                           "max_new_tokens": max_new_tokens})
        fb = max_new_tokens is not None
        return [[self.output(p, j, fb, seed) for j in range(num_samples)] for p in prompts]


def hash_score(prompt: str, response: str) -> float:
    return float(int(h(f"{prompt}|{response}"), 16) % 4)  # many ties on purpose


class Scorer:
    def __init__(self, rule=hash_score):
        self.rule = rule
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return np.array([self.rule(p, r) for p, r in zip(prompts, responses, strict=True)])


def j_of(text: str) -> int:
    return int(text.rsplit("-", 1)[1])


def expected_best(samples):
    """Independent argmax: np.argmax returns the first (lowest index) maximum."""
    scores = [s.score for s in sorted(samples, key=lambda s: s.sample_idx)]
    return int(np.argmax(scores))


def run(cfg, instructions=INSTRUCTIONS, preferences=None, seed=7, chat=True, scorer=None):
    gen, scorer = FakeGenerator(chat), scorer or Scorer()
    prefs = [None] * len(instructions) if preferences is None else preferences
    return gen, scorer, prs_sample(gen, scorer, instructions, prefs, cfg, seed)


def fmt(text):
    return f"<user>{text}</user>"


# --------------------------------------------------------------------------------------------
def test_fake_generator_satisfies_protocol():
    assert isinstance(FakeGenerator(), TextGenerator)


def test_two_layer_structure_and_parents():
    cfg = PRSConfig(n=6)
    assert cfg.widths == (3, 3) and cfg.layer_starts == (0, 3)
    _, _, results = run(cfg)
    assert len(results) == len(INSTRUCTIONS)
    for x, samples in zip(INSTRUCTIONS, results, strict=True):
        assert [s.sample_idx for s in samples] == list(range(6))
        assert [s.layer for s in samples] == [0, 0, 0, 1, 1, 1]
        assert all(s.parent_idx == -1 and s.feedback is None for s in samples[:3])
        best = expected_best(samples[:3])
        assert all(s.parent_idx == best for s in samples[3:])
        for s in samples:  # scores are the scorer's, on the original instruction
            assert s.score == hash_score(x, s.text)
        first = fmt(f"{x}\n\n{DEFAULT_PREFERENCE}")
        assert all(s.gen_prompt == first for s in samples[:3])
        assert [j_of(s.text) for s in samples] == [0, 1, 2, 0, 1, 2]
        assert all(s.text.startswith(f"resp-{h(first)}-") for s in samples[:3])
        feedbacks = {s.feedback for s in samples[3:]}
        assert len(feedbacks) == 1 and next(iter(feedbacks)).startswith("fb-")


def test_refine_prompts_contain_best_response_and_feedback():
    cfg = PRSConfig(n=4)
    gen, _, results = run(cfg)
    for x, samples in zip(INSTRUCTIONS, results, strict=True):
        best = samples[expected_best(samples[:2])]
        for s in samples[2:]:
            assert best.text in s.gen_prompt
            assert s.feedback in s.gen_prompt
            assert x in s.gen_prompt and DEFAULT_PREFERENCE in s.gen_prompt
            assert s.gen_prompt == fmt(cfg.refine_template.format(
                question=x, answer=best.text, feedback=s.feedback, preference=DEFAULT_PREFERENCE))
            assert s.text.startswith(f"resp-{h(s.gen_prompt)}-")
        # the feedback really is the model's answer to this prompt's feedback request
        fb_call = next(c for c in gen.calls if c["max_new_tokens"] is not None)
        fb_prompt = fb_call["prompts"][INSTRUCTIONS.index(x)]
        assert samples[2].feedback == FakeGenerator.output(fb_prompt, 0, True, fb_call["seed"]).text


def test_feedback_prompt_has_question_best_answer_and_preference():
    cfg = PRSConfig(n=4, feedback_max_new_tokens=17)
    gen, _, results = run(cfg)
    fb_calls = [c for c in gen.calls if c["max_new_tokens"] is not None]
    assert len(fb_calls) == 1  # one feedback per prompt per refinement step
    call = fb_calls[0]
    assert call["k"] == 1 and call["max_new_tokens"] == 17
    assert len(call["prompts"]) == len(INSTRUCTIONS)
    for x, samples, prompt in zip(INSTRUCTIONS, results, call["prompts"], strict=True):
        best = samples[expected_best(samples[:2])]
        assert x in prompt and best.text in prompt and DEFAULT_PREFERENCE in prompt
        assert prompt == fmt(cfg.feedback_template.format(
            question=x, answer=best.text, preference=DEFAULT_PREFERENCE))
        assert "impartial judge" in prompt


def test_best_is_by_score_with_lowest_index_tie_break():
    _, _, results = run(PRSConfig(n=6), scorer=Scorer(lambda p, r: 0.0))
    assert all(s.parent_idx == 0 for per in results for s in per[3:])
    # layer 0: j=1 and j=2 tie for the top score -> 1; a lower score at j=0
    _, _, results = run(PRSConfig(n=6), scorer=Scorer(lambda p, r: [1.0, 5.0, 5.0][j_of(r)]))
    assert all(s.parent_idx == 1 for per in results for s in per[3:])
    _, _, results = run(PRSConfig(n=6), scorer=Scorer(lambda p, r: -float(j_of(r))))
    assert all(s.parent_idx == 0 for per in results for s in per[3:])
    # the hash scorer produces both ties and non-zero winners across prompts
    _, _, results = run(PRSConfig(n=6), instructions=[f"prompt {i}" for i in range(20)])
    parents = {per[3].parent_idx for per in results}
    assert len(parents) > 1


def test_uneven_widths():
    cfg = PRSConfig(n=5, widths=(2, 3))
    gen, _, results = run(cfg)
    for samples in results:
        assert [s.sample_idx for s in samples] == list(range(5))
        assert [s.layer for s in samples] == [0, 0, 1, 1, 1]
        assert [s.parent_idx for s in samples[:2]] == [-1, -1]
        assert {s.parent_idx for s in samples[2:]} == {expected_best(samples[:2])}
    assert [c["k"] for c in gen.calls] == [2, 1, 3]
    cfg = PRSConfig(n=5, widths=[4, 1])  # a list is accepted and stored as a tuple
    assert cfg.widths == (4, 1)


def test_three_layers_use_best_over_all_previous_layers():
    cfg = PRSConfig(n=6, layers=3)
    assert cfg.widths == (2, 2, 2)
    instructions = [f"prompt number {i}" for i in range(12)]
    gen, _, results = run(cfg, instructions=instructions)
    assert [c["k"] for c in gen.calls] == [2, 1, 2, 1, 2]
    fb_calls = [c for c in gen.calls if c["max_new_tokens"] is not None]
    from_layer1 = 0
    for i, samples in enumerate(results):
        assert [s.layer for s in samples] == [0, 0, 1, 1, 2, 2]
        b0 = expected_best(samples[:2])
        b01 = expected_best(samples[:4])
        assert {s.parent_idx for s in samples[2:4]} == {b0}
        assert {s.parent_idx for s in samples[4:]} == {b01}
        from_layer1 += b01 >= 2
        best = samples[b01]
        assert best.text in samples[4].gen_prompt and samples[4].feedback in samples[4].gen_prompt
        assert best.text in fb_calls[1]["prompts"][i]
        assert samples[4].feedback != samples[2].feedback  # a fresh feedback per step
    assert from_layer1 > 0  # some layer-2 parents come from layer 1


def test_config_validation():
    with pytest.raises(ValueError, match="split evenly"):
        PRSConfig(n=5)
    with pytest.raises(ValueError, match="sum to"):
        PRSConfig(n=6, widths=(2, 2))
    with pytest.raises(ValueError, match="widths"):
        PRSConfig(n=6, widths=(2, 2, 2))  # 3 widths for 2 layers
    with pytest.raises(ValueError, match=">= 1"):
        PRSConfig(n=4, widths=(4, 0))
    with pytest.raises(ValueError, match=">= 1"):
        PRSConfig(n=0)
    with pytest.raises(ValueError, match="lacks slot"):
        PRSConfig(n=4, refine_template="{question} {answer}")
    with pytest.raises(ValueError, match="unknown slot"):
        PRSConfig(n=4, feedback_template="{answer} {reward}")
    assert PRSConfig(n=7, layers=1).widths == (7,)
    assert PRSConfig(n=9, layers=3).widths == (3, 3, 3)


def test_per_prompt_preferences_override_default():
    cfg = PRSConfig(n=4)
    prefs = ["I like one-word answers.", None, "Be rude."]
    gen, _, results = run(cfg, instructions=INSTRUCTIONS[:3], preferences=prefs)
    fb_prompts = next(c for c in gen.calls if c["max_new_tokens"] is not None)["prompts"]
    for pref, samples, fb_prompt in zip(prefs, results, fb_prompts, strict=True):
        z = DEFAULT_PREFERENCE if pref is None else pref
        assert all(z in s.gen_prompt for s in samples)
        assert z in fb_prompt
        if pref is not None:
            assert all(DEFAULT_PREFERENCE not in s.gen_prompt for s in samples)
            assert DEFAULT_PREFERENCE not in fb_prompt
    custom = PRSConfig(n=4, preference="Short please.")
    _, _, results = run(custom, instructions=["x"])
    assert results[0][0].gen_prompt == fmt("x\n\nShort please.")
    with pytest.raises(ValueError, match="preferences"):
        prs_sample(FakeGenerator(), Scorer(), ["a", "b"], [None], cfg, 0)


def test_token_accounting_is_exact():
    cfg = PRSConfig(n=7, layers=3, widths=(3, 2, 2))
    gen, _, results = run(cfg)
    fb_calls = [c for c in gen.calls if c["max_new_tokens"] is not None]
    for i, samples in enumerate(results):
        fb_tokens = [len(FakeGenerator.output(c["prompts"][i], 0, True, c["seed"]).token_ids)
                     for c in fb_calls]
        for layer, start in zip((1, 2), (3, 5), strict=True):
            group = [s for s in samples if s.layer == layer]
            assert group[0].sample_idx == start
            assert group[0].extra_tokens == fb_tokens[layer - 1]
            assert all(s.extra_tokens == 0 for s in group[1:])
            fb_prompt = fb_calls[layer - 1]["prompts"][i]
            assert all(s.feedback_prompt_tokens == len(fb_prompt.split()) for s in group)
        assert all(s.extra_tokens == 0 and s.feedback_prompt_tokens == 0
                   for s in samples if s.layer == 0)
        assert all(s.prompt_tokens == len(s.gen_prompt.split()) for s in samples)
        response_tokens = sum(len(s.token_ids) for s in samples)
        assert generated_tokens(samples) == response_tokens + sum(fb_tokens)
    # total over everything the fake generator emitted
    emitted = sum(len(FakeGenerator.output(p, j, c["max_new_tokens"] is not None,
                                          c["seed"]).token_ids)
                  for c in gen.calls for p in c["prompts"] for j in range(c["k"]))
    assert sum(generated_tokens(s) for s in results) == emitted


def test_batching_and_seeds():
    cfg = PRSConfig(n=6, layers=3, feedback_max_new_tokens=9)
    gen, scorer, results = run(cfg, seed=11)
    assert len(gen.calls) == cfg.layers + (cfg.layers - 1)
    for c in gen.calls:
        assert len(c["prompts"]) == len(INSTRUCTIONS)  # every call covers all prompts
    kinds = [("fb" if c["max_new_tokens"] else "sample") for c in gen.calls]
    assert kinds == ["sample", "fb", "sample", "fb", "sample"]
    assert [c["seed"] for c in gen.calls] == [
        derive_seed(11, "prs", 0, "sample"), derive_seed(11, "prs", 1, "feedback"),
        derive_seed(11, "prs", 1, "sample"), derive_seed(11, "prs", 2, "feedback"),
        derive_seed(11, "prs", 2, "sample")]
    # one scorer call per layer, all prompts, on the original instructions
    assert len(scorer.calls) == cfg.layers
    for (prompts, responses), width in zip(scorer.calls, cfg.widths, strict=True):
        assert prompts == [x for x in INSTRUCTIONS for _ in range(width)]
        assert len(responses) == len(prompts)
    # deterministic
    _, _, again = run(cfg, seed=11)
    assert again == results
    assert prs_sample(gen, scorer, [], [], cfg, 0) == []


def test_chat_template_flag():
    cfg = PRSConfig(n=2, use_chat_template=False)
    _, _, results = run(cfg, instructions=["hello"], chat=False)
    assert results[0][0].gen_prompt == f"hello\n\n{DEFAULT_PREFERENCE}"
    with pytest.raises(ValueError, match="chat template"):
        run(cfg, instructions=["hello"], chat=True)


def test_scorer_output_checked():
    with pytest.raises(ValueError, match="non-finite"):
        run(PRSConfig(n=2), scorer=Scorer(lambda p, r: float("nan")))
    with pytest.raises(ValueError, match="scores for"):
        prs_sample(FakeGenerator(), lambda p, r: np.zeros(1), INSTRUCTIONS, None, PRSConfig(n=2), 0)


def prompts_frame(instructions, preferences=None):
    n = len(instructions)
    return pl.DataFrame({
        "prompt_id": [f"test-{i:05d}" for i in range(n)],
        "split": ["test"] * n,
        "prompt": list(instructions),
        "text_id": [f"t{i}" for i in range(n)],
        "group": ["g"] * n,
        "n_words": [len(x.split()) for x in instructions],
        "preference": preferences or [None] * n,
    }, schema_overrides={"preference": pl.String, "n_words": pl.Int32})


def test_samples_table_conforms_and_layer_table():
    cfg = PRSConfig(n=5, widths=(2, 3))
    prompts = prompts_frame(INSTRUCTIONS)
    _, _, results = run(cfg)
    seen = {}

    def ref(instr, ids):
        seen["instr"], seen["ids"] = instr, ids
        return -np.arange(len(ids), dtype=float)

    samples, layers = prs_samples_table(prompts, results, ref)
    assert samples.columns == SCHEMAS["samples"].names
    table = conform(samples, "samples")
    assert table.num_rows == len(INSTRUCTIONS) * 5
    assert seen["instr"] == [x for x in INSTRUCTIONS for _ in range(5)]  # original instructions
    assert set(samples["strategy"]) == {"prs"}
    assert samples["layer"].dtype == pl.Int8 and samples["parent_idx"].dtype == pl.Int32
    flat = [s for per in results for s in per]
    assert samples["layer"].to_list() == [s.layer for s in flat]
    assert samples["parent_idx"].to_list() == [s.parent_idx for s in flat]
    assert samples["response"].to_list() == [s.text for s in flat]
    assert samples["n_tokens"].to_list() == [len(s.token_ids) for s in flat]
    assert samples["ref_logprob"].to_list() == list(-np.arange(len(flat), dtype=float))
    assert samples["prompt"].to_list() == seen["instr"]

    assert layers.height == len(INSTRUCTIONS) * 2
    for col in ("prompt_id", "layer", "feedback", "feedback_tokens", "prompt_tokens"):
        assert col in layers.columns
    total = int(layers["feedback_tokens"].sum() + layers["response_tokens"].sum())
    assert total == sum(generated_tokens(per) for per in results)
    row = layers.filter((pl.col("prompt_id") == "test-00000") & (pl.col("layer") == 1)).row(
        0, named=True)
    assert row["feedback"] == results[0][2].feedback
    assert row["parent_idx"] == results[0][2].parent_idx
    assert row["parent_score"] == results[0][row["parent_idx"]].score
    assert row["prompt_tokens"] == results[0][2].prompt_tokens
    l0 = layers.filter(pl.col("layer") == 0)
    assert l0["feedback"].null_count() == l0.height and set(l0["feedback_tokens"]) == {0}

    samples2, _ = prs_samples_table(prompts, results, np.zeros(len(flat)))  # precomputed values
    conform(samples2, "samples")
    with pytest.raises(ValueError, match="ref log-probs"):
        prs_samples_table(prompts, results, np.zeros(3))
    with pytest.raises(ValueError, match="results"):
        prs_samples_table(prompts_frame(INSTRUCTIONS[:2]), results, ref)


# --------------------------------------------------------------------------------------------
# Hugging Face adapter on the tiny GPT-2 of conftest.py
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_backend(tiny_policy_dir):
    from pipeline_lib.generation.hf import HFBackend
    from pipeline_lib.models.loading import load_causal_lm, load_tokenizer

    return HFBackend(load_causal_lm(tiny_policy_dir), load_tokenizer(tiny_policy_dir), "cpu")


def test_hf_text_generator_end_to_end(tiny_backend):
    from pipeline_lib.generation.sampling import SamplingParams

    gen = HFTextGenerator(tiny_backend, use_chat_template=True,
                          params=SamplingParams(max_new_tokens=6))
    assert not gen.uses_chat_template  # the tiny tokenizer has none → identity formatting
    assert gen.format_prompt("a great") == "a great"
    tok = tiny_backend.tokenizer
    assert gen.count_tokens("a great") == len(tok("a great")["input_ids"]) + 1  # + BOS
    cfg = PRSConfig(n=4, feedback_max_new_tokens=5)
    instructions = ["a great film", "the plot is"]

    def score(prompts, responses):
        return np.array([len(r) for r in responses], dtype=float)

    results = prs_sample(gen, score, instructions, [None, "short"], cfg, seed=3)
    assert [len(r) for r in results] == [4, 4]
    for per in results:
        assert [s.layer for s in per] == [0, 0, 1, 1]
        assert [s.sample_idx for s in per] == [0, 1, 2, 3]
        assert {s.parent_idx for s in per[2:]} == {int(np.argmax([per[0].score, per[1].score]))}
        for s in per:
            assert 1 <= len(s.token_ids) <= 6
            assert s.score == len(s.text)
            assert s.finished == (s.token_ids[-1] == tok.eos_token_id)
        assert 1 <= per[2].extra_tokens <= 5 and per[3].extra_tokens == 0
    # the refine prompts exceed the 64-position context and are cut from the left
    assert gen.n_truncated > 0
    again = prs_sample(HFTextGenerator(tiny_backend, params=SamplingParams(max_new_tokens=6)),
                       score, instructions, [None, "short"], cfg, seed=3)
    assert [[s.token_ids for s in per] for per in again] == \
        [[s.token_ids for s in per] for per in results]

    # chunked generation (batch_size) gives the same shapes
    chunked = HFTextGenerator(tiny_backend, params=SamplingParams(max_new_tokens=4), batch_size=2)
    out = chunked.generate(["a great", "the plot", "boring"], 2, seed=1)
    assert [len(o) for o in out] == [2, 2, 2]

    samples, layers = generate_prs_table(
        tiny_backend, prompts_frame(instructions, [None, "short"]), cfg,
        SamplingParams(max_new_tokens=6), score, seed=3)
    table = conform(samples, "samples")
    assert table.num_rows == 8 and layers.height == 4
    assert np.isfinite(samples["ref_logprob"].to_numpy()).all()
    assert samples["response_token_ids"].to_list() == [s.token_ids for per in results for s in per]


def test_hf_text_generator_chat_template(tiny_policy_dir):
    from pipeline_lib.generation.hf import HFBackend
    from pipeline_lib.generation.sampling import SamplingParams
    from pipeline_lib.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_policy_dir)
    tok.chat_template = ("{% for m in messages %}[U]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[A]{% endif %}")
    backend = HFBackend(load_causal_lm(tiny_policy_dir), tok, "cpu")
    gen = HFTextGenerator(backend, use_chat_template=True, params=SamplingParams(max_new_tokens=3))
    assert gen.uses_chat_template
    assert gen.format_prompt("a great") == "[U]a great[A]"
    assert gen.encode("[U]a great[A]") == tok("[U]a great[A]", add_special_tokens=False)[
        "input_ids"]
    plain = HFTextGenerator(backend, use_chat_template=False)
    assert plain.format_prompt("a great") == "a great"
    assert plain.encode("a great")[0] == tok.bos_token_id
    results = prs_sample(gen, lambda p, r: np.zeros(len(r)), ["a great"], None,
                         PRSConfig(n=2, feedback_max_new_tokens=3), seed=0)
    assert results[0][0].gen_prompt.startswith("[U]a great") and \
        results[0][0].gen_prompt.endswith("[A]")
    # a stored conversation (HH transcript) is rendered turn by turn, as every stage renders it
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}[A]{% endif %}")
    convo = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a great\n\nAssistant:"
    assert gen.format_prompt(convo) == "[user]hi[assistant]hello[user]a great[A]"
