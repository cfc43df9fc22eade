"""The profiles, and the tiny DAG run through SLURM on a real single-node test cluster.

Two profiles meet on a cluster run: the workflow profile profiles/default/config.yaml (per-rule
resources; Snakemake reads it by itself, also on local runs, where it changes nothing) and the
user's `slurm` profile (executor, account, partitions, retries), which setup.sh installs from
profiles/slurm/ into $XDG_CONFIG_HOME/snakemake/slurm/ (~/.config/snakemake/slurm/) with
profiles/install_slurm_profile.py, so that `snakemake --cores all --profile slurm` finds it by
name. The profile tests need no cluster.

The cluster (slurmctld, slurmd, slurmdbd + a private mariadbd, munged; all on 127.0.0.1) is
started by tests/slurm/start_cluster.sh from Debian's packages (.ci/install-slurm.sh installs
them). Where it cannot be started (not root, packages missing, a daemon that does not come
up), the cluster tests skip and the reason names the step that failed; with
BON_REQUIRE_SLURM=1 they fail instead.

The DAG runs as users run it: `snakemake --cores all --profile slurm`, with XDG_CONFIG_HOME
pointing at a temporary directory where the install script put the profile and the test
filled in the test cluster's account and partition, as a user edits theirs. The test checks in
`sacct` that every job but the local rules' went through sbatch with the workflow profile's
resources, that the tables equal those of the session's local run of the same config (the
`tiny_dag` fixture, which test_dag.py reads too), and that a job killed for exceeding its
memory is retried with more (the profile's `retries`, the attempt-scaled `mem_mb`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dag_support import ROOT, TINY, job_counts, snakemake_cmd, snakemake_env, table_equal

WORKFLOW_PROFILE = ROOT / "profiles" / "default"
SLURM_TEMPLATE = ROOT / "profiles" / "slurm"
LOCAL_PROFILE = ROOT / "profiles" / "local"
INSTALL = ROOT / "profiles" / "install_slurm_profile.py"
START = ROOT / "tests" / "slurm" / "start_cluster.sh"
STOP = ROOT / "tests" / "slurm" / "stop_cluster.sh"
PARTITION, ACCOUNT = "debug", "bontest"  # made by start_cluster.sh
RUN_TIMEOUT_S = 1500  # the tiny DAG through SLURM: 9-10 min measured on 2 busy cores
CLUSTER_KEYS = ("slurm_account", "slurm_partition", "partition", "account", "gpu_model", "gres")


def load_profile(path: Path) -> dict:
    # FullLoader, as Snakemake's profile reader (yte) does: the profiles use YAML merge keys.
    return yaml.load((path / "config.yaml").read_text(), Loader=yaml.FullLoader)


def rule_blocks() -> dict[str, str]:
    """Rule name -> its source text, from the Snakefile and workflow/rules/*.smk."""
    blocks: dict[str, str] = {}
    for f in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        parts = re.split(r"^rule (\w+):", f.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            blocks[name] = body
    return blocks


def local_rules() -> set[str]:
    """The Snakefile's `localrules` (run where Snakemake runs, never submitted)."""
    block = re.search(r"^localrules:\n((?:    \w+,?\n)+)", (ROOT / "Snakefile").read_text(), re.M)
    return set(re.findall(r"\w+", block[1]))


def install_profile(config_home: Path, **env: str) -> str:
    """setup.sh's step: the install script, with XDG_CONFIG_HOME = ``config_home``."""
    proc = subprocess.run([sys.executable, str(INSTALL)], capture_output=True, text=True,
                          env={**os.environ, "XDG_CONFIG_HOME": str(config_home), **env},
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def configure_for_test_cluster(config_home: Path) -> Path:
    """What a user of the test cluster would edit in the installed profile: the account and
    the CPU partition (it has no GPU partition; the tiny config runs on `device: cpu`, so no
    job asks for a GPU)."""
    profile = config_home / "snakemake" / "slurm"
    for name, old, new in (("config.yaml", "YOUR_ACCOUNT", ACCOUNT),
                           ("partitions.yaml", "YOUR_CPU_PARTITION", PARTITION)):
        text = (profile / name).read_text()
        assert old in text, (name, old)
        (profile / name).write_text(text.replace(old, new))
    return profile


def snakemake_run(cwd: Path, cmd: list[str], config_home: Path | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess:
    env = snakemake_env(**({"XDG_CONFIG_HOME": str(config_home)} if config_home else {}))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=timeout)


# --------------------------------------------------------------------------------------
# The profiles (no cluster needed).


def test_workflow_profile_is_found_by_itself_and_local_runs_stay_local(tmp_path):
    """`snakemake -n` from the repository root, and with --snakefile from elsewhere, reads
    profiles/default without being told, and plans a local run (no executor, no retries)."""
    from_root = snakemake_run(ROOT, [sys.executable, "-m", "snakemake", "-n", "--directory",
                                     str(tmp_path), "--configfile",
                                     str(ROOT / "config" / "config.yaml")])
    out = from_root.stdout + from_root.stderr
    assert from_root.returncode == 0, out
    assert "Using workflow specific profile profiles/default" in out
    elsewhere = snakemake_run(tmp_path, snakemake_cmd(tmp_path, "-n"))
    out = elsewhere.stdout + elsewhere.stderr
    assert elsewhere.returncode == 0, out
    assert f"workflow specific profile {WORKFLOW_PROFILE}" in out
    assert "Job stats:" in out


def test_workflow_profile_holds_per_rule_resources_only():
    """Every rule but `all` has memory and time in the workflow profile, growing with the
    attempt; the GPU rules (those whose `gpu` the rules declare) have CPUs per GPU; nothing
    there is cluster-specific or changes how a local run behaves; partitions and accounts
    appear in no rule either."""
    from snakemake.cli import get_argument_parser

    profile = load_profile(WORKFLOW_PROFILE)
    assert set(profile) == {"set-resources"}
    blocks = rule_blocks()
    rules = set(blocks) - {"all"}
    per_rule = profile["set-resources"]
    assert set(per_rule) == rules, "rules without (or unknown rules with) profile resources"
    gpu_rules = {name for name, body in blocks.items() if re.search(r"^\s+gpu=", body, re.M)}
    assert gpu_rules == {"sft", "preferences", "reward_model", "sample", "score", "train",
                         "evaluate", "prs_compare"}
    assert not gpu_rules & local_rules()
    for rule in ("sft", "reward_model", "train"):  # one GPU per accelerate process
        assert re.search(r"^\s+gpu=TRAIN_GPUS,", blocks[rule], re.M), rule
    for rule, res in per_rule.items():
        for key in ("mem_mb", "runtime"):
            first, second = (eval(str(res[key]), {"attempt": a}) for a in (1, 2))
            assert second == 2 * first, (rule, key)
        assert "gpu" not in res and not set(res) & set(CLUSTER_KEYS), rule  # GPUs: the rules'
        assert (res.get("cpus_per_gpu", 0) >= 1) == (rule in gpu_rules), rule
    for name, body in blocks.items():
        assert not re.search(r"\b(slurm_\w+|partition|account|gpu_model|gres)\s*=", body), name
    args = get_argument_parser(profiles=[str(WORKFLOW_PROFILE)]).parse_args([])
    assert set(args.set_resources) == rules
    assert args.executor is None and not args.retries and not args.rerun_incomplete
    assert not args.resources  # no global caps: a local run blocks on nothing


def test_slurm_profile_is_installed_by_name_and_never_overwritten(tmp_path):
    """The install script puts the template where `--profile slurm` finds it; run again, or
    where a profile exists (the user's, or a site-wide one), it changes nothing."""
    home = tmp_path / "config"
    out = install_profile(home)
    installed = home / "snakemake" / "slurm"
    for name in ("config.yaml", "partitions.yaml"):
        assert (installed / name).read_text() == (SLURM_TEMPLATE / name).read_text()
        assert f"installed {installed / name}" in out
    # the plain form, from the repository root
    dry = snakemake_run(ROOT, [sys.executable, "-m", "snakemake", "--cores", "all", "--profile",
                               "slurm", "-n", "--directory", str(tmp_path / "work"),
                               "--configfile", str(TINY)], config_home=home)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert ("Using profiles slurm and workflow specific profile profiles/default"
            in dry.stderr)
    # never overwritten
    mine = (installed / "config.yaml").read_text() + "# my edits\n"
    (installed / "config.yaml").write_text(mine)
    (installed / "partitions.yaml").unlink()
    out = install_profile(home)
    assert "left as it is" in out and str(installed / "config.yaml") in out
    assert (installed / "config.yaml").read_text() == mine
    assert not (installed / "partitions.yaml").exists()
    # a directory with only some files: the missing ones are added, the others kept
    partial = tmp_path / "partial"
    (partial / "snakemake" / "slurm").mkdir(parents=True)
    (partial / "snakemake" / "slurm" / "partitions.yaml").write_text("partitions: {}\n")
    out = install_profile(partial)
    assert (partial / "snakemake" / "slurm" / "partitions.yaml").read_text() == "partitions: {}\n"
    assert (partial / "snakemake" / "slurm" / "config.yaml").exists() and "kept your" in out
    # a site-wide profile (searched after the user's) wins over installing one
    site = tmp_path / "site"
    (site / "snakemake" / "slurm").mkdir(parents=True)
    (site / "snakemake" / "slurm" / "config.yaml").write_text("executor: slurm\n")
    out = install_profile(tmp_path / "empty", XDG_CONFIG_DIRS=str(site))
    assert str(site / "snakemake" / "slurm" / "config.yaml") in out
    assert not (tmp_path / "empty" / "snakemake" / "slurm").exists()


def test_slurm_profile_and_workflow_profile_combine(tmp_path, monkeypatch):
    """`--profile slurm` (installed, account filled in) plus the workflow profile: the SLURM
    executor with retries, the account, the partition file, and every rule's resources."""
    from snakemake.cli import parse_args

    home = tmp_path / "config"
    install_profile(home)
    profile = configure_for_test_cluster(home)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    monkeypatch.chdir(ROOT)
    _, args = parse_args(["--cores", "all", "--profile", "slurm"])
    assert args.executor == "slurm"
    assert args.retries >= 1 and args.rerun_incomplete and args.keep_going
    assert "slurm_account" in args.default_resources
    assert str(args.default_resources["slurm_account"].raw) in (ACCOUNT, repr(ACCOUNT))
    assert Path(args.slurm_partition_config) == profile / "partitions.yaml"
    assert set(args.set_resources) == set(load_profile(WORKFLOW_PROFILE)["set-resources"])
    assert args.set_resources["sample"]["cpus_per_gpu"].value >= 1
    local = parse_args(["--profile", str(LOCAL_PROFILE)])[1]
    assert local.rerun_incomplete and local.executor is None


def test_partition_file_sends_gpu_jobs_to_a_gpu_partition(tmp_path):
    """The plugin's partition choice from the installed partitions.yaml: a job that asks for
    GPUs goes to the GPU partition, a CPU-only job to the CPU partition."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file

    home = tmp_path / "config"
    install_profile(home)
    partitions = read_partition_file(configure_for_test_cluster(home) / "partitions.yaml")
    log = logging.getLogger("test")

    def job(**resources):
        return SimpleNamespace(name="job", threads=1,
                               resources={"mem_mb": 16000, "runtime": 60, **resources})

    assert get_best_partition(partitions, job(), log) == PARTITION
    assert get_best_partition(partitions, job(gpu=1, cpus_per_gpu=4), log) == "YOUR_GPU_PARTITION"
    assert get_best_partition(partitions, job(gpu=2, cpus_per_gpu=4), log) == "YOUR_GPU_PARTITION"


# --------------------------------------------------------------------------------------
# The DAG on the test cluster.


def run_bounded(cmd: list[str], cwd: Path, timeout: float,
                env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run snakemake; on timeout interrupt it (it then cancels its SLURM jobs), then kill."""
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
        # and remove the configs it wrote: with no controller behind them, every later
        # `snakemake` would wait ~10 s (the SLURM plugin runs `scontrol show config` on import)
        subprocess.run(["bash", str(STOP), "--remove-config"], capture_output=True, timeout=180,
                       check=False)


@pytest.fixture(scope="module")
def config_home(cluster, tmp_path_factory) -> Path:
    """XDG_CONFIG_HOME holding the `slurm` profile as setup.sh installs it, with the test
    cluster's account and partition filled in."""
    home = tmp_path_factory.mktemp("xdg-config")
    install_profile(home)
    configure_for_test_cluster(home)
    return home


def slurm_cmd(workdir: Path, *args: str, configfile: Path = TINY) -> list[str]:
    """The README's command, plus status checks every 2 s instead of every 40 s (the tiny jobs
    take seconds)."""
    return snakemake_cmd(workdir, "--cores", "all", "--profile", "slurm",
                         "--slurm-init-seconds-before-status-checks", "2", *args,
                         configfile=configfile)


@pytest.fixture(scope="module")
def runs(config_home, tiny_dag, tmp_path_factory):
    """The tiny DAG through SLURM, and the session's local run of the same config (started
    first, in the background, unless test_dag.py already ran it: the SLURM run mostly waits)."""
    slurm_dir = tmp_path_factory.mktemp("slurm")
    tiny_dag.start()
    started = time.monotonic()
    slurm = run_bounded(slurm_cmd(slurm_dir), slurm_dir, RUN_TIMEOUT_S,
                        snakemake_env(XDG_CONFIG_HOME=str(config_home)))
    slurm_s = time.monotonic() - started
    assert slurm.returncode == 0, f"SLURM run failed:\n{slurm.stdout[-20000:]}"
    local_results = tiny_dag.wait()
    print(f"SLURM run: {slurm_s:.0f} s")
    return {"slurm_dir": slurm_dir, "local_results": local_results, "output": slurm.stdout,
            "env": snakemake_env(XDG_CONFIG_HOME=str(config_home))}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.slurm
def test_every_job_went_through_sbatch_with_the_profiles_resources(runs):
    out = runs["output"]
    assert "Using profiles slurm and workflow specific profile" in out
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    counts = job_counts(out)
    counts.pop("all")  # the target rule runs nothing
    local = local_rules() - {"import_cache", "chatterbot_dataset"}  # not in the tiny DAG
    assert local <= set(counts)
    for rule in local:  # run by this process, not submitted
        assert f"localrule {rule}:" in out, rule
    expected = Counter({rule: n for rule, n in counts.items() if rule not in local})
    assert len(job_ids) == sum(expected.values()), "every job but the local ones was submitted"
    rows = sacct(job_ids)
    assert len(rows) == len(job_ids), rows
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    for row in rows:
        assert row["State"] == "COMPLETED", row
        assert (row["JobName"], row["Partition"], row["Account"]) == (run_id, PARTITION, ACCOUNT)
    assert Counter(rule_of(r["Comment"]) for r in rows) == expected
    # the workflow profile's resources reached sbatch (first attempt): memory and wall time
    by_rule = {rule_of(r["Comment"]): r for r in rows}
    profile = load_profile(WORKFLOW_PROFILE)["set-resources"]
    for rule in ("sft", "train", "sample", "score"):
        mem_mb = int(str(profile[rule]["mem_mb"]).replace("* attempt", ""))
        minutes = int(str(profile[rule]["runtime"]).replace("* attempt", ""))
        assert by_rule[rule]["ReqMem"] == f"{mem_mb}M", by_rule[rule]
        assert by_rule[rule]["Timelimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.slurm
def test_tables_equal_a_local_run(runs):
    """The same config and seed give identical tables, through SLURM or locally."""
    slurm_results = runs["slurm_dir"] / "results"
    local_results = runs["local_results"].parent
    tables = sorted(p.relative_to(local_results) for p in local_results.rglob("*.parquet"))
    assert len(tables) > 20
    assert tables == sorted(p.relative_to(slurm_results) for p in slurm_results.rglob("*.parquet"))
    differ = [str(rel) for rel in tables
              if not table_equal(local_results / rel, slurm_results / rel)]
    assert not differ, f"tables differ between the SLURM and the local run: {differ}"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.slurm
def test_a_job_killed_for_memory_is_retried_with_more(runs):
    """`score` (test split) gets 50 MB on its first attempt, so SLURM kills it (OverMemoryKill
    on the test cluster); the profile's retries resubmit it with attempt-scaled memory."""
    workdir = runs["slurm_dir"]
    target = workdir / "results" / "tiny" / "rewards" / "test.parquet"
    target.unlink()
    # the target first: --set-resources takes several values (and replaces the workflow
    # profile's set-resources; only this job runs)
    proc = run_bounded(slurm_cmd(workdir, str(target.relative_to(workdir)), "--set-resources",
                                 "score:mem_mb=50 * 160 ** (attempt - 1)"),
                       workdir, 600, runs["env"])
    assert proc.returncode == 0, proc.stdout[-20000:]
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout)
    rows = sacct(job_ids)
    assert [rule_of(r["Comment"]) for r in rows] == ["score", "score"], rows
    first, second = rows
    assert first["State"] in ("OUT_OF_MEMORY", "FAILED", "CANCELLED"), first
    assert (first["ReqMem"], second["ReqMem"]) == ("50M", "8000M")
    assert second["State"] == "COMPLETED"
    assert table_equal(runs["local_results"] / "rewards/test.parquet", target)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.slurm
def test_a_train_job_runs_accelerate_launch_inside_its_slurm_job(runs, tmp_path):
    """training.launch = ddp, 2 processes: the train job is one sbatch job whose script runs
    `accelerate launch` (2 processes, gloo on this CPU cluster); DPO's table equals the local
    one-process run's, since its batches are split over the ranks."""
    import polars as pl

    from pipeline_lib.io.tables import read_provenance

    workdir = runs["slurm_dir"]
    config = yaml.safe_load(TINY.read_text())
    config["training"]["launch"] = {"accelerate_config": "ddp", "num_processes": 2}
    config["training"]["ppo"]["minibatch_size"] = 2
    configfile = tmp_path / "tiny-ddp.yaml"
    configfile.write_text(yaml.safe_dump(config))
    target = "results/tiny/logs/train-dpo-n4-b0.1.parquet"
    proc = run_bounded(slurm_cmd(workdir, target, "--forcerun", "train", configfile=configfile),
                       workdir, 600, runs["env"])
    assert proc.returncode == 0, proc.stdout[-20000:]
    job_ids = re.findall(r"has been submitted with SLURM jobid (\d+)", proc.stdout)
    rows = sacct(job_ids)
    assert [(rule_of(r["Comment"]), r["State"]) for r in rows] == [("train", "COMPLETED")]
    log_text = (workdir / "results/tiny/logs/train-dpo-n4-b0.1.log").read_text()
    assert "launching 2 process(es)" in log_text
    assert read_provenance(workdir / target)["processes"] == 2
    one = pl.read_parquet(runs["local_results"].parent.parent / target)
    two = pl.read_parquet(workdir / target)
    for col in ("loss", "reward_margin", "accuracy"):
        assert two[col].to_list() == pytest.approx(one[col].to_list(), rel=1e-4, abs=1e-5), col
