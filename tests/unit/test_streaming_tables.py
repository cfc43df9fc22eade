"""Tables written and read part by part: the atomic row-group writer, sample shards written as
they are drawn (a killed shard leaves nothing and its rerun is the same table), and
gather_samples copying in-order shards row group by row group."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from test_stages import prompts_frame

from pipeline_lib.io.tables import (
    SchemaError,
    TableWriter,
    read_polars,
    read_provenance,
    table_writer,
    write_table,
)
from pipeline_lib.settings.sections import Settings
from pipeline_lib.stages import generate as generate_mod
from pipeline_lib.stages.common import StageError
from pipeline_lib.stages.gather import run_gather
from pipeline_lib.stages.generate import LOGPROB_ROWS, generate_table, make_backend
from pipeline_lib.stages.sample import run_sample_shard

pytestmark = pytest.mark.usefixtures("one_thread")


def _rewards(rows: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame({"prompt_id": [f"p{seed}"] * rows, "sample_idx": list(range(rows)),
                         "scorer": ["gold"] * rows, "kind": ["gold"] * rows,
                         "reward": rng.normal(size=rows)})


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_table_writer_appends_validated_row_groups_atomically(tmp_path):
    out = tmp_path / "rewards.parquet"
    parts = [_rewards(4, seed) for seed in range(3)]
    with table_writer(out, "rewards", {"stage": "t"}) as writer:
        for part in parts:
            writer.write(part)
        assert not out.exists()  # nothing visible before the block ends
    assert pq.ParquetFile(out).num_row_groups == 3 and writer.rows == 12
    got = read_polars(out, "rewards")
    assert got.equals(pl.concat(parts).with_columns(pl.col("sample_idx").cast(pl.Int32)))
    assert read_provenance(out) == {"stage": "t"}
    # a failure inside the block keeps the previous table and leaves no partial file
    with pytest.raises(RuntimeError), table_writer(out, "rewards") as writer:
        writer.write(_rewards(5, 9))
        raise RuntimeError("killed")
    assert read_polars(out, "rewards").equals(got) and _files(tmp_path) == ["rewards.parquet"]
    # a part that does not fit the schema is refused, naming the file
    with pytest.raises(SchemaError, match=f"{out}: missing column"), \
            table_writer(out, "rewards") as writer:
        writer.write(_rewards(2, 1).drop("kind"))
    assert read_polars(out, "rewards").equals(got)
    with table_writer(tmp_path / "empty.parquet", "rewards"):
        pass
    assert read_polars(tmp_path / "empty.parquet", "rewards").height == 0


@pytest.fixture
def sampling(tiny_policy_dir, config, tmp_path):
    """5 prompts x M = 60 (300 rows: more than one LOGPROB_ROWS part), 2 shards."""
    config["sampling"].update(M={"train": 60, "test": 60}, shards=2)
    config["generation"].update(batch_size=120, max_new_tokens=4)
    write_table(prompts_frame(5), tmp_path / "prompts.parquet", "prompts")
    s = Settings.from_config(config)
    whole = generate_table(make_backend(s, tiny_policy_dir, "cpu"), prompts_frame(5), None, 60,
                           s.generation, s.seed, "train")
    assert whole.height == 300 > LOGPROB_ROWS
    return config, whole


def _shard(config, policy, tmp_path, k: int, name: str | None = None):
    out = tmp_path / (name or f"shard-{k}.parquet")
    run_sample_shard(config, "train", k, policy, tmp_path / "prompts.parquet", out)
    return out


def test_a_shard_is_written_as_it_is_drawn_and_a_killed_one_reruns_the_same(
        sampling, tiny_policy_dir, tmp_path, monkeypatch):
    config, whole = sampling
    config["sampling"]["shards"] = 1
    out = _shard(config, tiny_policy_dir, tmp_path, 0)
    assert pq.ParquetFile(out).num_row_groups == 2  # 256 + 44 rows
    assert read_polars(out, "samples").equals(
        whole.with_columns(pl.col(c).cast(pl.Int32) for c in ("sample_idx", "n_tokens",
                                                              "parent_idx"))
        .with_columns(pl.col("layer").cast(pl.Int8)))
    # killed while drawing the third group, after parts were written (64-row parts here):
    # no table, no partial file; the rerun is the table of an uninterrupted run
    monkeypatch.setattr(generate_mod, "LOGPROB_ROWS", 64)
    config["generation"]["batch_size"] = 60  # one prompt per group
    complete = read_polars(_shard(config, tiny_policy_dir, tmp_path, 0, "complete.parquet"),
                           "samples")
    real, calls, written = generate_mod.sample_groups, {"n": 0}, []

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    real_write = TableWriter.write
    monkeypatch.setattr(generate_mod, "sample_groups", dying)
    monkeypatch.setattr(TableWriter, "write",
                        lambda self, part: (written.append(len(part)), real_write(self, part)))
    with pytest.raises(KeyboardInterrupt):
        _shard(config, tiny_policy_dir, tmp_path, 0, "rerun.parquet")
    assert written == [64]  # one part was on its way to disk when the job died
    assert not [n for n in _files(tmp_path) if "rerun" in n]
    monkeypatch.setattr(generate_mod, "sample_groups", real)
    rerun = _shard(config, tiny_policy_dir, tmp_path, 0, "rerun.parquet")
    assert read_polars(rerun, "samples").equals(complete)
    assert pq.ParquetFile(rerun).num_row_groups == 5  # 4 x 64 + 44


def test_gather_copies_in_order_shards_and_sorts_others(sampling, tiny_policy_dir, tmp_path):
    config, whole = sampling
    shards = [_shard(config, tiny_policy_dir, tmp_path, k) for k in range(2)]
    single = tmp_path / "single"
    single.mkdir()
    one = dict(config, sampling={**config["sampling"], "shards": 1})
    write_table(prompts_frame(5), single / "prompts.parquet", "prompts")
    reference = read_polars(_shard(one, tiny_policy_dir, single, 0), "samples")
    prompts = tmp_path / "prompts.parquet"
    run_gather(config, "train", shards, prompts, tmp_path / "gathered.parquet")
    gathered = read_polars(tmp_path / "gathered.parquet", "samples")
    assert gathered.equals(reference)
    # copied row group by row group: the shards' row groups, not one table
    assert pq.ParquetFile(tmp_path / "gathered.parquet").num_row_groups == sum(
        pq.ParquetFile(p).num_row_groups for p in shards) > 1
    # shards given out of order are read whole and sorted: the same table
    run_gather(config, "train", shards[::-1], prompts, tmp_path / "sorted.parquet")
    assert read_polars(tmp_path / "sorted.parquet", "samples").equals(reference)
    # a missing sample is still the clear error
    short = read_polars(shards[1], "samples").head(-1)
    write_table(short, tmp_path / "short.parquet", "samples")
    with pytest.raises(StageError, match="has 59 samples, expected M=60"):
        run_gather(config, "train", [shards[0], tmp_path / "short.parquet"], prompts,
                   tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def test_score_reads_texts_in_parts_aligned_to_each_scorers_batches(
        sampling, tiny_policy_dir, tmp_path, monkeypatch):
    """Parts of 8 rows at batch size 4 give exactly the table of scoring the split whole
    (the same batches, so the same padding), row for row, in row groups of 8."""
    from transformers import AutoModelForSequenceClassification

    from pipeline_lib.models.loading import load_tokenizer, save_model
    from pipeline_lib.stages import score as score_mod

    config, whole = sampling
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    tok = load_tokenizer(tiny_policy_dir)
    rm.config.pad_token_id = tok.pad_token_id
    save_model(rm, tok, tmp_path / "rm")
    config["reward_models"]["seeds"] = [1]
    config["scoring"] = {**config.get("scoring", {}), "batch_size": 4}
    samples = write_table(whole.head(40), tmp_path / "samples.parquet", "samples")
    models = {"rm-seed1": tmp_path / "rm"}
    score_mod.run_score(config, "train", samples, models, tmp_path / "whole.parquet")
    monkeypatch.setattr(score_mod, "SCORE_PART_ROWS", 9)  # parts of 8 rows at batch size 4
    score_mod.run_score(config, "train", samples, models, tmp_path / "parts.parquet")
    parts = read_polars(tmp_path / "parts.parquet", "rewards")
    assert parts.equals(read_polars(tmp_path / "whole.parquet", "rewards"))
    assert parts["scorer"].to_list() == ["gold"] * 40 + ["rm-seed1"] * 40
    assert parts.filter(pl.col("scorer") == "gold")["sample_idx"].to_list() == \
        whole.head(40)["sample_idx"].to_list()
    assert pq.ParquetFile(tmp_path / "parts.parquet").num_row_groups > 5
