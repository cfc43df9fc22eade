"""The SLURM profile, and the tiny DAG run through SLURM on a real single-node test cluster.

The cluster (slurmctld, slurmd, slurmdbd + a private mariadbd, munged; all on 127.0.0.1) is
started by tests/slurm/start_cluster.sh from Debian's packages (.ci/install-slurm.sh installs
them). Where it cannot be started (not root, packages missing, a daemon that does not come
up), the cluster tests skip and the reason names the step that failed; with
BON_REQUIRE_SLURM=1 they fail instead.

The DAG runs as users run it: `snakemake --profile profiles/slurm`, plus the overrides that
the CPU-only test cluster needs (its partition and account, no GPUs; derived from the
profile itself, see `test_cluster_overrides`). The test checks in `sacct` that every job went
through sbatch with the profile's resources, that the tables equal a local run's, and that a
job killed for exceeding its memory is retried with more (the profile's `retries` and
attempt-scaled `mem_mb`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny.yaml"
PROFILE = ROOT / "profiles" / "slurm"
LOCAL_PROFILE = ROOT / "profiles" / "local"
START = ROOT / "tests" / "slurm" / "start_cluster.sh"
STOP = ROOT / "tests" / "slurm" / "stop_cluster.sh"
PARTITION, ACCOUNT = "debug", "bontest"  # made by start_cluster.sh
RUN_TIMEOUT_S = 1500  # the tiny DAG through SLURM: 9-10 min measured on 2 busy cores
# Resources the CPU-only test cluster cannot honour: replaced (gpu -> 0) or dropped.
GPU_KEYS = ("gpu_model", "gres", "cpus_per_gpu", "slurm_partition")


def load_profile(path: Path = PROFILE) -> dict:
    # FullLoader, as Snakemake's profile reader (yte) does: the profile uses YAML merge keys.
    return yaml.load((path / "config.yaml").read_text(), Loader=yaml.FullLoader)


def rule_blocks() -> dict[str, str]:
    """Rule name -> its source text, from the Snakefile and workflow/rules/*.smk."""
    blocks: dict[str, str] = {}
    for f in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        parts = re.split(r"^rule (\w+):", f.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            blocks[name] = body
    return blocks


def cluster_overrides(profile: dict) -> list[str]:
    """The command-line overrides for the test cluster, derived from the profile.

    `--default-resources` and `--set-resources` on the command line replace the profile's
    whole entry, so `--set-resources` restates every per-rule resource of the profile, with
    `gpu` set to 0 and the GPU-only keys (and the GPU partition) dropped."""
    set_resources = [
        f"{rule}:{key}={0 if key == 'gpu' else value}"
        for rule, resources in profile["set-resources"].items()
        for key, value in resources.items()
        if key not in GPU_KEYS
    ]
    return [
        "--default-resources", f"slurm_partition={PARTITION}", f"slurm_account={ACCOUNT}",
        "--set-resources", *set_resources,
        # status checks every 2 s instead of every 40 s: the tiny jobs take seconds
        "--slurm-init-seconds-before-status-checks", "2",
    ]


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
            "--directory", str(workdir), "--configfile", str(TINY), *args]


def run_bounded(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run snakemake; on timeout interrupt it (it then cancels its SLURM jobs), then kill."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        run_id = re.search(r"SLURM run ID: (\S+)", out or "")
        if run_id and shutil.which("scancel"):
            subprocess.run(["scancel", "--name", run_id.group(1)], timeout=30, check=False)
        raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{out}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def sacct(job_ids: list[str]) -> list[dict[str, str]]:
    fields = ["JobIDRaw", "JobName", "State", "Partition", "Account", "Comment", "ReqMem",
              "Timelimit"]
    rows: list[dict[str, str]] = []
    for _ in range(60):  # slurmdbd records a finished job within a second or two
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
            capture_output=True, text=True, timeout=30, check=True).stdout
        rows = [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines()]
        if len(rows) == len(job_ids) and all(r["State"] not in ("PENDING", "RUNNING")
                                             for r in rows):
            break
        time.sleep(1)
    return rows


def rule_of(comment: str) -> str:
    """The plugin's job comment is rule_<rule> or rule_<rule>_wildcards_<values>."""
    return re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment).group(1)


def job_counts(output: str) -> Counter:
    """The 'Job stats' table Snakemake prints: rule -> number of jobs."""
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)})


def table_equal(a_path: Path, b_path: Path) -> bool:
    a = pq.read_table(a_path).replace_schema_metadata(None)
    b = pq.read_table(b_path).replace_schema_metadata(None)
    if "elapsed_s" in a.column_names:  # wall-clock column differs; nothing else may
        a, b = a.drop(["elapsed_s"]), b.drop(["elapsed_s"])
    return a.equals(b)


# --------------------------------------------------------------------------------------
# The profile itself (no cluster needed).


def test_profile_resolves_from_the_repository_root(monkeypatch):
    """`snakemake --profile profiles/slurm` (the README's form) finds the profile."""
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(ROOT)
    for name in ("profiles/slurm", "profiles/local"):
        found = get_profile_dir(name)
        assert found is not None, name
        assert found[1].resolve() == (ROOT / name / "config.yaml").resolve()


def test_profile_parses_with_attempt_scaled_resources():
    """Snakemake reads the profile (YAML merge keys included); memory and time grow with
    the attempt."""
    from snakemake.cli import get_argument_parser

    args = get_argument_parser(profiles=[str(PROFILE)]).parse_args(["--profile", str(PROFILE)])
    assert args.executor == "slurm"
    assert args.retries >= 1 and args.rerun_incomplete
    assert set(args.set_resources) == set(load_profile()["set-resources"])
    sample, sft = args.set_resources["sample"], args.set_resources["sft"]
    assert sample["gpu"].value == 1 and sample["cpus_per_gpu"].value >= 1
    assert "gpu" not in sft and sft["cpus_per_gpu"].value >= 1  # from training.launch
    assert {"slurm_partition", "slurm_account"} <= set(args.default_resources)
    for rule, res in load_profile()["set-resources"].items():
        for key in ("mem_mb", "runtime"):
            first, second = (eval(str(res[key]), {"attempt": a}) for a in (1, 2))
            assert second == 2 * first, (rule, key)
    local = get_argument_parser(profiles=[str(LOCAL_PROFILE)]).parse_args(
        ["--profile", str(LOCAL_PROFILE)])
    assert local.rerun_incomplete and local.executor is None


def test_profile_covers_every_rule_and_rules_hold_no_cluster_settings():
    """Every rule has resources in the profile; exactly the rules that declare a GPU ask for
    one there (partition from the &gpu block); the CPU-only rules ask for none; memory grows
    with the attempt; partition and account appear in the profile only, never in rules."""
    profile = load_profile()
    blocks = rule_blocks()
    rules = set(blocks) - {"all"}
    gpu_rules = {name for name, body in blocks.items() if re.search(r"^\s+gpu\s*=", body, re.M)}
    per_rule = profile["set-resources"]
    assert set(per_rule) == rules, "rules without (or unknown rules with) profile resources"
    # the training jobs' GPU count is the rules' own (training.launch.num_processes)
    training = {"sft", "reward_model", "train"}
    for rule in training:
        assert rule in gpu_rules and "gpu" not in per_rule[rule], rule
        assert re.search(r"^\s+gpu=TRAIN_GPUS,", blocks[rule], re.M), rule
    assert {r for r, res in per_rule.items() if res.get("gpu", 0) >= 1} == gpu_rules - training
    for rule, res in per_rule.items():
        assert "attempt" in str(res["mem_mb"]) and "attempt" in str(res["runtime"]), rule
        if rule in gpu_rules:
            assert res["slurm_partition"] and res["cpus_per_gpu"] >= 1, rule
        else:
            assert not set(res) & {"gpu", "gpu_model", "gres", "cpus_per_gpu"}, rule
    assert {"slurm_partition", "slurm_account"} <= set(profile["default-resources"])
    for name, body in blocks.items():
        assert not re.search(r"\b(slurm_\w+|partition|account|gpu_model|gres)\s*=", body), name


def test_cluster_overrides():
    overrides = cluster_overrides(load_profile())
    start = overrides.index("--set-resources") + 1
    end = next(i for i in range(start, len(overrides)) if overrides[i].startswith("--"))
    set_resources = overrides[start:end]
    assert "sample:gpu=0" in set_resources and "sft:mem_mb=16000 * attempt" in set_resources
    assert "prompts:mem_mb=2000 * attempt" in set_resources
    assert not [o for o in set_resources if o.split("=")[0].split(":")[1] in GPU_KEYS]


# --------------------------------------------------------------------------------------
# The DAG on the test cluster.


def _cluster_was_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return "UP" in ping.stdout


def _not_started(reason: str):
    if os.environ.get("BON_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM test cluster not started: {reason}")
    pytest.skip(f"SLURM test cluster not started: {reason}")


@pytest.fixture(scope="module")
def cluster():
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _not_started("step 'check executor plugin' failed: snakemake-executor-plugin-slurm "
                     "is not installed (pip install -e '.[slurm]')")
    if os.name != "posix" or os.geteuid() != 0:
        _not_started("step 'check root' failed: the test cluster's daemons run as root "
                     "(run the tests as root, e.g. in CI)")
    was_up = _cluster_was_up()
    try:
        proc = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        steps = re.findall(r"^start_cluster: (.*)$", (exc.stdout or b"").decode(), re.M)
        _not_started(f"start_cluster.sh timed out after 300 s in step "
                     f"'{steps[-1] if steps else '?'}'")
    if proc.returncode != 0:
        failed = re.findall(r"^start_cluster: FAILED at step .*$", proc.stdout, re.M)
        _not_started(failed[-1] if failed else
                     f"start_cluster.sh exited {proc.returncode}: {proc.stderr[-2000:]}")
    yield
    if not was_up:  # leave a cluster that was already running as it was
        subprocess.run(["bash", str(STOP)], capture_output=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny DAG through SLURM with the profile, and a local run of the same config with
    the local profile (started first, in the background: the SLURM run mostly waits)."""
    local_dir = tmp_path_factory.mktemp("local")
    slurm_dir = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    local = subprocess.Popen(snakemake_cmd(local_dir, "--profile", str(LOCAL_PROFILE)),
                             cwd=local_dir, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        started = time.monotonic()
        slurm = run_bounded(
            snakemake_cmd(slurm_dir, "--profile", str(PROFILE), *cluster_overrides(load_profile())),
            slurm_dir, RUN_TIMEOUT_S)
        slurm_s = time.monotonic() - started
        local_out, _ = local.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if local.poll() is None:
            os.killpg(local.pid, signal.SIGKILL)
            local.communicate()
    assert slurm.returncode == 0, f"SLURM run failed:\n{slurm.stdout[-20000:]}"
    assert local.returncode == 0, f"local run failed:\n{local_out[-20000:]}"
    print(f"SLURM run: {slurm_s:.0f} s")
    return {"slurm_dir": slurm_dir, "local_dir": local_dir, "output": slurm.stdout}


@pytest.mark.integration
@pytest.mark.slurm
def test_every_job_went_through_sbatch_with_the_profiles_resources(runs):
    out = runs["output"]
    assert "Using profile" in out and str(PROFILE) in out
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    expected = job_counts(out)
    expected.pop("all")  # the target rule runs nothing
    assert len(job_ids) == sum(expected.values()), "every job (and only those) was submitted"
    rows = sacct(job_ids)
    assert len(rows) == len(job_ids), rows
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    for row in rows:
        assert row["State"] == "COMPLETED", row
        assert (row["JobName"], row["Partition"], row["Account"]) == (run_id, PARTITION, ACCOUNT)
    assert Counter(rule_of(r["Comment"]) for r in rows) == expected
    # the profile's resources reached sbatch (first attempt): memory and wall time per rule
    by_rule = {rule_of(r["Comment"]): r for r in rows}
    profile = load_profile()["set-resources"]
    for rule in ("sft", "train", "prompts", "summary"):
        mem_mb = int(str(profile[rule]["mem_mb"]).replace("* attempt", ""))
        minutes = int(str(profile[rule]["runtime"]).replace("* attempt", ""))
        assert by_rule[rule]["ReqMem"] == f"{mem_mb}M", by_rule[rule]
        assert by_rule[rule]["Timelimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00"


@pytest.mark.integration
@pytest.mark.slurm
def test_tables_equal_a_local_run(runs):
    slurm_results = runs["slurm_dir"] / "results"
    local_results = runs["local_dir"] / "results"
    tables = sorted(p.relative_to(local_results) for p in local_results.rglob("*.parquet"))
    assert len(tables) > 20
    assert tables == sorted(p.relative_to(slurm_results) for p in slurm_results.rglob("*.parquet"))
    differ = [str(rel) for rel in tables
              if not table_equal(local_results / rel, slurm_results / rel)]
    assert not differ, f"tables differ between the SLURM and the local run: {differ}"


@pytest.mark.integration
@pytest.mark.slurm
def test_a_job_killed_for_memory_is_retried_with_more(runs):
    """`summary` gets 50 MB on its first attempt, so SLURM kills it (OverMemoryKill on the
    test cluster); the profile's retries resubmit it with attempt-scaled memory."""
    workdir = runs["slurm_dir"]
    target = workdir / "results" / "tiny" / "summary.parquet"
    target.unlink()
    overrides = cluster_overrides(load_profile())
    overrides = [("summary:mem_mb=50 * 40 ** (attempt - 1)" if o.startswith("summary:mem_mb=")
                  else o) for o in overrides]
    proc = run_bounded(snakemake_cmd(workdir, "--profile", str(PROFILE), *overrides,
                                     str(target.relative_to(workdir))), workdir, 600)
    assert proc.returncode == 0, proc.stdout[-20000:]
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout)
    rows = sacct(job_ids)
    assert [rule_of(r["Comment"]) for r in rows] == ["summary", "summary"], rows
    first, second = rows
    assert first["State"] in ("OUT_OF_MEMORY", "FAILED", "CANCELLED"), first
    assert (first["ReqMem"], second["ReqMem"]) == ("50M", "2000M")
    assert second["State"] == "COMPLETED"
    assert table_equal(runs["local_dir"] / "results/tiny/summary.parquet", target)


@pytest.mark.integration
@pytest.mark.slurm
def test_a_train_job_runs_accelerate_launch_inside_its_slurm_job(runs, tmp_path):
    """training.launch = ddp, 2 processes: the train job is one sbatch job whose script runs
    `accelerate launch` (2 processes, gloo on this CPU cluster); DPO's table equals the local
    one-process run's, since its batches are split over the ranks."""
    import polars as pl

    from pipeline_lib.schemas import read_provenance

    workdir = runs["slurm_dir"]
    config = yaml.safe_load(TINY.read_text())
    config["training"]["launch"] = {"accelerate_config": "ddp", "num_processes": 2}
    config["training"]["ppo"]["minibatch_size"] = 2
    configfile = tmp_path / "tiny-ddp.yaml"
    configfile.write_text(yaml.safe_dump(config))
    target = "results/tiny/logs/train-dpo-n4-b0.1.parquet"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), target, "--configfile", str(configfile),
           "--profile", str(PROFILE), *cluster_overrides(load_profile()), "--forcerun", "train"]
    proc = run_bounded(cmd, workdir, 600)
    assert proc.returncode == 0, proc.stdout[-20000:]
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout)
    rows = sacct(job_ids)
    assert [(rule_of(r["Comment"]), r["State"]) for r in rows] == [("train", "COMPLETED")]
    log_text = (workdir / "results/tiny/logs/train-dpo-n4-b0.1.log").read_text()
    assert "launching 2 process(es)" in log_text
    assert read_provenance(workdir / target)["processes"] == 2
    one = pl.read_parquet(runs["local_dir"] / target)
    two = pl.read_parquet(workdir / target)
    for col in ("loss", "reward_margin", "accuracy"):
        assert two[col].to_list() == pytest.approx(one[col].to_list(), rel=1e-4, abs=1e-5), col
