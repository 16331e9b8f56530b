"""Sweeps: one report per job at a path named by its overrides, re-launches skip finished jobs
(Hydra's basic launcher, then the joblib one), the shipped cluster launcher configs; the
reproducibility meta."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import CLIPVisionModel

from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.program.hydra_job import existing_report
from fusion_bench.scripts.cli import CONFIG_DIR
from fusion_bench.utils.provenance import file_fingerprint

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


def job_dir(sweep, **overrides):
    """The folder Hydra gives a job: its sorted ``key=value`` overrides (``hydra.job.override_dirname``),
    one level: a config group's choice ``Group/name`` is written ``Group.name``."""
    items = sorted(f"{k}={v}" for k, v in overrides.items())
    return sweep / ",".join(i.replace("/", ".") if "." not in i.partition("=")[0] else i for i in items)


def task_arithmetic_oracle(tiny_example, scaling_factor):
    """θ0 + λ Σ (θi − θ0), computed here from the saved models, evaluated in this process."""
    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    base = CLIPVisionModel.from_pretrained(tiny_example.base_model)
    theta0 = vision_state_dict(base)
    experts = [vision_state_dict(CLIPVisionModel.from_pretrained(p)) for p in tiny_example.finetuned.values()]
    merged = {k: v + scaling_factor * sum(e[k] - v for e in experts) for k, v in theta0.items()}
    with torch.no_grad():
        for k, v in vision_state_dict(base).items():
            v.copy_(merged[k])
    pool = CLIPVisionModelTaskPool(
        test_datasets={t: str(p) for t, p in tiny_example.datasets.items()},
        clip_model=str(tiny_example.base_model),
        head_cache_dir=None,
        dataloader_kwargs={"batch_size": 16},
    )
    return pool.evaluate(base)


def test_basic_launcher_sweep_layout_skip_existing_and_meta(tiny_example, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "method=task_arithmetic", *TINY, f"hydra.sweep.dir={sweep}"]
    proc = run_cli([*args, "method.scaling_factor=0.2,0.6"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    common = {
        "method": "task_arithmetic",
        "modelpool": "CLIPVisionModelPool/tiny-clip_example",
        "taskpool": "CLIPVisionModelTaskPool/tiny-clip_example",
    }
    paths = {lam: job_dir(sweep, **common, **{"method.scaling_factor": lam}) / "report.json" for lam in (0.2, 0.6)}
    reports = {lam: json.loads(p.read_text()) for lam, p in paths.items()}
    for lam, report in reports.items():
        expected = task_arithmetic_oracle(tiny_example, lam)
        for task in tiny_example.datasets:
            assert report[task]["accuracy"] == expected[task]["accuracy"]
            assert report[task]["loss"] == pytest.approx(expected[task]["loss"], rel=1e-5)
        assert report["meta"]["config"]["method"]["scaling_factor"] == lam
        assert report["meta"]["hydra"]["choices"]["method"] == "task_arithmetic"
        assert report["meta"]["hydra"]["mode"] == "MULTIRUN"
    assert reports[0.2]["svhn"]["loss"] != reports[0.6]["svhn"]["loss"]

    # the reproducibility meta (independent oracles: a tiny file's sampled hash is sha256(size || file))
    meta = reports[0.2]["meta"]
    assert meta["accuracy_type"] == "absolute" and meta["seed"] == 42 and meta["fast_dev_run"] is False
    assert meta["packages"]["torch"] == torch.__version__.split("+")[0]
    assert meta["wall_seconds"] >= meta["total_seconds"] >= meta["fusion_seconds"] > 0
    assert 100 < meta["peak_memory"]["peak_rss_mib"] < 100_000
    assert set(meta["checkpoints"]) == {"_pretrained_", *tiny_example.finetuned}
    (entry,) = meta["checkpoints"]["mnist"]["files"]
    data = (tiny_example.finetuned["mnist"] / "model.safetensors").read_bytes()
    assert entry["size"] == len(data) < 1 << 20
    assert entry["sampled_sha256"] == hashlib.sha256(len(data).to_bytes(8, "little") + data).hexdigest()

    # re-launch with one more value, through Hydra's joblib launcher (jobs in parallel worker
    # processes): the two finished jobs are skipped, their reports untouched
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    before = {lam: p.stat().st_mtime_ns for lam, p in paths.items()}
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_cli(  # joblib's workers start from pickled jobs: a real process
        [*args, *joblib, "method.scaling_factor=0.2,0.6,1.0", "skip_existing_report=true"],
        cwd=tmp_path,
        fresh_process=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("run skipped (skip_existing_report=true)") == 2
    assert {lam: p.stat().st_mtime_ns for lam, p in paths.items()} == before
    new = json.loads((job_dir(sweep, **common, **{"method.scaling_factor": 1.0}) / "report.json").read_text())
    assert new["meta"]["config"]["method"]["scaling_factor"] == 1.0
    assert new["svhn"]["accuracy"] == task_arithmetic_oracle(tiny_example, 1.0)["svhn"]["accuracy"]


def test_existing_report_must_match_fast_dev_run(tmp_path):
    path = tmp_path / "r.json"
    assert existing_report(str(path), fast_dev_run=False) is None  # missing
    path.write_text("{not json")
    assert existing_report(str(path), fast_dev_run=False) is None
    path.write_text(json.dumps({"mnist": {"accuracy": 0.5}, "meta": {"fast_dev_run": True}}))
    assert existing_report(str(path), fast_dev_run=False) is None  # a one-batch report is no full run
    assert existing_report(str(path), fast_dev_run=True)["mnist"] == {"accuracy": 0.5}


def test_bad_skip_option_is_one_line_error(tiny_example, tmp_path):
    proc = run_cli(["taskpool=dummy", "skip_existing_report=maybe"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fusion_bench: error: skip_existing_report must be true or false, got 'maybe'"
    ]


def compose_launcher(name):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "fusion_bench_config", overrides=[f"hydra/launcher={name}", "fabric.devices=4"], return_hydra_config=True
        )


def test_shipped_slurm_config_composes_and_matches_submitits_schema():
    launcher = compose_launcher("slurm").hydra.launcher
    assert launcher._target_ == "hydra_plugins.fusion_bench_launchers.slurm_launcher.SlurmLauncher"
    # one SLURM task per device, so Lightning's SLURM environment makes the DDP ranks
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4
    config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config")
    merged = OmegaConf.merge(OmegaConf.structured(config.SlurmQueueConf), launcher)  # every field is the schema's
    assert merged.partition is None and merged.mem_gb == 64


def test_shipped_ray_config_composes_into_our_launcher():
    from hydra_plugins.fusion_bench_launchers.ray_launcher import RayLauncher

    launcher = compose_launcher("ray").hydra.launcher
    assert launcher._target_ == "hydra_plugins.fusion_bench_launchers.ray_launcher.RayLauncher"
    ray = RayLauncher(ray=launcher.ray)
    assert ray.init == {"address": None}
    assert ray.remote == {"num_gpus": 1, "num_cpus": 4, "max_calls": 1}


def test_file_fingerprint_modes_and_hub_cache(tmp_path):
    big = tmp_path / "model.safetensors"
    data = bytearray(range(256)) * (3 << 12)  # 3 MiB
    big.write_bytes(bytes(data))
    sampled = file_fingerprint(big)["sampled_sha256"]
    assert file_fingerprint(big, mode="full")["sha256"] == hashlib.sha256(data).hexdigest()
    data[-1] ^= 1  # the last block is always sampled
    big.write_bytes(bytes(data))
    assert file_fingerprint(big)["sampled_sha256"] != sampled
    # a hub cache file: revision from the snapshot folder, full sha256 from the blob's name
    blob = tmp_path / "hub" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    link = tmp_path / "hub" / "snapshots" / "c0ffee" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    facts = file_fingerprint(link)
    assert facts["revision"] == "c0ffee" and facts["sha256"] == "ab" * 32 and "sampled_sha256" not in facts
