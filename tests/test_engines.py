"""Sweeps on real engines, started by the tests: a one-node SLURM cluster (munged, slurmctld and
slurmd on 127.0.0.1) and a local Ray cluster. Each module-scoped cluster runs the shipped
launcher config (``hydra/launcher=slurm`` / ``ray``) on the built-in mini benchmark: two jobs, their
reports, the collected table, a re-launch that submits nothing, and a failed job that surfaces.

Missing engines skip these tests on a developer machine and fail them in CI (``CI=true``), whose
``.ci/run`` installs them (README "Sweeps").
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from engines import SLURM_PROGRAMS, missing_engine, ray_cluster, require_engine, slurm_cluster

from fusion_bench.data.mini_tasks import BENCHMARK_TASKS, benchmark_datasets_root

TA = ["method=task_arithmetic"]  # default pools: the built-in mini benchmark
FAST = ["fast_dev_run=true"]  # the failure sweeps: one batch per task is enough to keep a report
FAST_PREFIX = "fast_dev_run=True,"  # as Hydra names the job folder
SLURM_HOW = "apt-get install slurmctld slurmd slurm-client munge; pip install 'fusion_bench[slurm]'"
RAY_HOW = "pip install 'fusion_bench[ray]'"


def fusion_bench(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    """Run the ``fusion_bench`` command (this interpreter) in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "fusion_bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def job_folder(sweep: Path, scaling_factor: str, prefix: str = "") -> Path:
    """The folder of the job ``method=task_arithmetic method.scaling_factor=<value>`` (its sorted
    overrides; ``prefix``: those sorted before them, e.g. ``fast_dev_run=True,``)."""
    return sweep / f"{prefix}method.scaling_factor={scaling_factor},method=task_arithmetic"


def job_id(folder: Path) -> str:
    """The id Hydra gave the job (``hydra.job.id`` in its saved ``.hydra/hydra.yaml``)."""
    return str(yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


@pytest.fixture(scope="module")
def mini_data(_isolated_caches: None) -> None:
    """The mini benchmark's generated datasets, built here once (in this session's cache) rather
    than by the first jobs of a sweep, all at once."""
    benchmark_datasets_root()


def check_reports(sweep: Path, values: tuple[str, ...]) -> dict[str, dict]:
    """Each job's report: a full (not fast_dev_run) multirun report of task arithmetic with its λ."""
    reports = {v: json.loads((job_folder(sweep, v) / "report.json").read_text()) for v in values}
    for value, report in reports.items():
        meta = report["meta"]
        assert meta["config"]["method"]["scaling_factor"] == float(value)
        assert meta["hydra"]["mode"] == "MULTIRUN" and meta["fast_dev_run"] is False
        assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in BENCHMARK_TASKS)
    first, second = reports.values()
    assert first != second  # two different merges
    return reports


def check_table(sweep: Path, reports: dict[str, dict], env: dict[str, str], out: Path) -> str:
    """``fusion_bench_report`` over the sweep: one row per job whose cells are that report's
    accuracies in percent; the printed Markdown table."""
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_bench.scripts.report", str(sweep), "--out", str(out), "--no-figures"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = (out / "methods.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 1 + len(reports)
    for value, report in reports.items():
        (row,) = [r for r in rows[1:] if f"scaling_factor={value}" in r]
        cells = dict(zip(header, row.rsplit('"', 1)[-1].split(",")))  # the label is quoted
        for task in header[1:-2]:  # label, tasks..., avg, flags
            assert float(cells[task]) == pytest.approx(100 * report[task]["accuracy"], abs=1e-9)
    return proc.stdout


def check_failure(proc: subprocess.CompletedProcess, sweep: Path, good: str) -> Path:
    """A sweep with one bad job: exit 1, one line naming the bad job and its log, the good report kept."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fusion_bench: error: sweep job #")]
    assert len(lines) == 1, proc.stderr[-3000:]
    head, _, log = lines[0].rpartition("; log: ")
    job, _, reason = head.partition("): ")  # "... #1 (<overrides>) failed (<where>): <reason>"
    assert "#1 (method=task_arithmetic fast_dev_run=True method.scaling_factor=abc)" in job
    assert "'abc'" in reason  # the job's own error (a ValueError today), whichever way the job reported it
    log = Path(log)
    assert log.is_file() and reason.split(": ")[-1] in log.read_text()
    assert "Traceback" not in proc.stderr
    report = json.loads((job_folder(sweep, good, FAST_PREFIX) / "report.json").read_text())
    assert report["meta"]["config"]["method"]["scaling_factor"] == float(good)
    return log


def test_missing_engine_skips_locally_and_fails_in_ci(monkeypatch):
    assert missing_engine(("sh",), ("json",)) is None
    reason = missing_engine(("no-such-program-fb",), ("no_such_module_fb",))
    assert reason == "not installed: no-such-program-fb, no_such_module_fb"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed: no-such-program-fb"):
        require_engine(reason, "apt-get install ...")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but the sweep engine is missing"):
        require_engine(reason, "apt-get install ...")
    require_engine(None, "installed: nothing happens")


# ---------------------------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory, mini_data: None):
    """A one-node SLURM cluster for this module; its daemons are stopped at the end, also on failure."""
    require_engine(missing_engine(SLURM_PROGRAMS, ("submitit", "hydra_plugins.hydra_submitit_launcher")), SLURM_HOW)
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), cpus=2, mem_mb=4096, partition="cpu") as cluster:
        cluster.env["FUSION_BENCH_SLURM_POLL_S"] = "1"
        yield cluster


def slurm_args(cluster, sweep: Path) -> list[str]:
    """The shipped SLURM launcher with what a one-node CPU cluster needs: its partition, no GPUs,
    one CPU and 1 GB per job (two jobs at once on 2 cores)."""
    return [
        "-m",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep}",
        f"hydra.launcher.partition={cluster.partition}",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
    ]


def test_slurm_sweep_reports_table_and_relaunch(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    proc = fusion_bench([*slurm_args(slurm, sweep), *TA, "method.scaling_factor=0.1,0.3"], tmp_path, slurm.env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the jobs went through sbatch: one job array, its tasks known to the controller and in the
    # job completion log, each job's Hydra id its SLURM id, submitit's folder per job
    ids = {v: job_id(job_folder(sweep, v)) for v in ("0.1", "0.3")}
    array = {i.split("_")[0] for i in ids.values()}
    assert len(array) == 1 and all(re.fullmatch(r"\d+_[01]", i) for i in ids.values()), ids
    (array_id,) = array
    queue = slurm.run("squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%P|%j", f"--jobs={array_id}")
    assert sorted(queue.split()) == sorted(f"{i}|COMPLETED|cpu|fusion_bench" for i in ids.values()), queue
    done = [j for j in slurm.finished_jobs() if j.get("ArrayJobId") == array_id]
    assert sorted(j["ArrayTaskId"] for j in done) == ["0", "1"] and {j["JobState"] for j in done} == {"COMPLETED"}
    for i in ids.values():
        assert (sweep / ".submitit" / i / f"{i}_0_result.pkl").is_file()
        assert "Job completed successfully" in (sweep / ".submitit" / i / f"{i}_0_log.err").read_text()
    reports = check_reports(sweep, ("0.1", "0.3"))
    table = check_table(sweep, reports, slurm.env, tmp_path / "tables")
    assert "task_arithmetic (scaling_factor=0.1)" in table and "task_arithmetic (scaling_factor=0.3)" in table

    # a re-launch with skip_existing_report=true submits nothing; the reports stay as they are
    before = {v: (job_folder(sweep, v) / "report.json").stat().st_mtime_ns for v in ids}
    known = set(slurm.run("squeue", "--noheader", "--array", "--states=all", "--format=%i").split())
    proc = fusion_bench(
        [*slurm_args(slurm, sweep), *TA, "method.scaling_factor=0.1,0.3", "skip_existing_report=true"],
        tmp_path,
        slurm.env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # Hydra logs the launcher's messages to stdout
    assert "nothing submitted" in output and "submitted SLURM jobs" not in output
    assert set(slurm.run("squeue", "--noheader", "--array", "--states=all", "--format=%i").split()) == known
    assert {v: (job_folder(sweep, v) / "report.json").stat().st_mtime_ns for v in ids} == before


def test_slurm_failed_job_surfaces_and_others_are_kept(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    proc = fusion_bench([*slurm_args(slurm, sweep), *TA, *FAST, "method.scaling_factor=0.3,abc"], tmp_path, slurm.env)
    log = check_failure(proc, sweep, "0.3")
    assert log.parent.parent == sweep / ".submitit" and log.name.endswith("_log.err")


def test_slurm_job_killed_without_result_is_named(tmp_path, monkeypatch):
    """A job whose process died (no result file: an exit status, a signal, a time limit) is
    reported with its SLURM state and its log's last line."""
    from hydra_plugins.fusion_bench_launchers import slurm_launcher

    err = tmp_path / "7_1_0_log.err"
    err.write_text("loading...\nfusion_bench: error: unknown method 'nope'\n")
    job = SimpleNamespace(job_id="7_1", paths=SimpleNamespace(stderr=err, result_pickle=tmp_path / "missing.pkl"))
    monkeypatch.setattr(slurm_launcher, "slurm_states", lambda ids: {"7_0": "COMPLETED", "7_1": "FAILED"})
    ret, failure = slurm_launcher.SlurmLauncher._outcome(job, 1, ["method=nope", "hydra.sweep.dir=x"])
    assert ret is None
    assert failure.line() == (
        f"fusion_bench: error: sweep job #1 (method=nope) failed (SLURM job 7_1, FAILED): "
        f"fusion_bench: error: unknown method 'nope'; log: {err}"
    )


def test_slurm_states_parse_squeue_and_fall_back_to_sacct(monkeypatch):
    from hydra_plugins.fusion_bench_launchers import slurm_launcher

    calls, query = [], slurm_launcher._query

    def fake(command):  # squeue knows array 5 only; sacct has array 6 (and a job step, skipped)
        calls.append(command[0])
        if command[0] == "squeue":
            return query(["printf", "5_0|RUNNING\n5_1|COMPLETED\n"])
        return query(["printf", "6_0|CANCELLED by 0\n6_0.batch|CANCELLED\n"])

    monkeypatch.setattr(slurm_launcher, "_query", fake)
    assert slurm_launcher.slurm_states({"5", "6", "7"}) == {
        "5_0": "RUNNING",
        "5_1": "COMPLETED",
        "6_0": "CANCELLED",
        "7": slurm_launcher.LEFT,
    }
    assert calls == ["squeue", "sacct"]
    # squeue failing: no guess about arrays nobody listed
    monkeypatch.setattr(slurm_launcher, "_query", lambda command: None)
    assert slurm_launcher.slurm_states({"7"}) == {}


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_local(mini_data: None):
    """A local Ray cluster on 127.0.0.1 for this module (2 CPUs, no dashboard), stopped at the end.
    Its folder is short: Ray's socket paths must fit the AF_UNIX limit."""
    require_engine(missing_engine((), ("ray",)), RAY_HOW)
    root = Path(tempfile.mkdtemp(prefix="fbray", dir="/tmp"))
    try:
        with ray_cluster(root, num_cpus=2) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ray_args(cluster, sweep: Path) -> list[str]:
    """The shipped Ray launcher on the test's cluster, one CPU and no GPU per job."""
    return [
        "-m",
        "hydra/launcher=ray",
        f"hydra.sweep.dir={sweep}",
        f"hydra.launcher.ray.init.address={cluster.address}",
        "hydra.launcher.ray.remote.num_gpus=0",
        "hydra.launcher.ray.remote.num_cpus=1",
    ]


def test_ray_sweep_reports_table_and_relaunch(ray_local, tmp_path):
    sweep = tmp_path / "sweep"
    proc = fusion_bench([*ray_args(ray_local, sweep), *TA, "method.scaling_factor=0.1,0.3"], tmp_path, ray_local.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr  # Hydra logs the launcher's messages to stdout
    assert "Connected to Ray cluster" in output
    (submitted,) = re.findall(r"submitted Ray tasks: (.*)", output)
    tasks = submitted.split()
    assert sorted(tasks) == sorted(job_id(job_folder(sweep, v)) for v in ("0.1", "0.3"))  # ran as those tasks
    assert sorted(p.name for p in (sweep / ".ray").iterdir()) == ["0.log", "1.log"]
    reports = check_reports(sweep, ("0.1", "0.3"))
    check_table(sweep, reports, ray_local.env, tmp_path / "tables")

    before = {v: (job_folder(sweep, v) / "report.json").stat().st_mtime_ns for v in ("0.1", "0.3")}
    proc = fusion_bench(
        [*ray_args(ray_local, sweep), *TA, "method.scaling_factor=0.1,0.3", "skip_existing_report=true"],
        tmp_path,
        ray_local.env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "nothing submitted" in output and "submitted Ray tasks" not in output
    assert "Connected to Ray cluster" not in output  # not even connected
    assert {v: (job_folder(sweep, v) / "report.json").stat().st_mtime_ns for v in before} == before


def test_ray_failed_job_surfaces_and_others_are_kept(ray_local, tmp_path):
    sweep = tmp_path / "sweep"
    proc = fusion_bench(
        [*ray_args(ray_local, sweep), *TA, *FAST, "method.scaling_factor=0.3,abc"], tmp_path, ray_local.env
    )
    log = check_failure(proc, sweep, "0.3")
    assert log == sweep / ".ray" / "1.log"
