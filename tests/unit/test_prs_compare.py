import polars as pl
import pytest

from pipeline_lib.settings.config import validate_config
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages.generate import prs_config
from pipeline_lib.stages.prs_compare import compare_summary


def test_compare_summary_hand_computed():
    rows = []
    # one prompt, N = 2: random best 0.5, PRS best 0.9 (layer 1 improves)
    for strategy, scores, layers, extra in (("random", [0.5, 0.1], [0, 0], [0, 0]),
                                            ("prs", [0.2, 0.9], [0, 1], [0, 7])):
        for i, (s, layer, e) in enumerate(zip(scores, layers, extra, strict=True)):
            rows.append(dict(strategy=strategy, N=2, prompt_id="p", sample_idx=i, layer=layer,
                             parent_idx=-1 if layer == 0 else 0, response="r", n_tokens=10,
                             extra_tokens=e, score=s))
    summary = compare_summary(pl.DataFrame(rows))
    prs = summary.filter(pl.col("strategy") == "prs").row(0, named=True)
    rnd = summary.filter(pl.col("strategy") == "random").row(0, named=True)
    assert prs["best_of_n"] == 0.9 and rnd["best_of_n"] == 0.5
    assert prs["tokens_per_prompt"] == 27.0 and rnd["tokens_per_prompt"] == 20.0
    assert prs["win_rate_vs_random"] == 1.0 and rnd["win_rate_vs_random"] is None
    assert prs["mean_score_layer0"] == pytest.approx(0.2)
    assert prs["mean_score_last_layer"] == pytest.approx(0.9)
    assert rnd["mean_score_last_layer"] == pytest.approx(0.3)


def test_prs_config_from_yaml_defaults():
    cfg = Settings.from_config(validate_config({"task": "t", "seed": 0})).prs
    two = prs_config(cfg, 8)
    assert two.widths == (4, 4) and two.layers == 2
    assert prs_config(cfg, 5).widths == (3, 2)  # an odd N puts the extra sample first
    assert prs_config(cfg, 8, layers=1).widths == (8,)  # random sampling = a one-layer tree
    assert "informative" in two.preference
    assert prs_config(cfg, 4, preference="be kind").preference == "be kind"
