"""The catalogue of bad inputs: each one is a single ``fusion_bench: error: ...`` line on stderr naming
the option, model, task or file, exit status 2, before any work, and no existing file changed.

The command runs in this process (:func:`cli`: ``main(argv)`` with stdout/stderr captured, Hydra's
global state cleared after each call); only what is about the process itself (Ctrl-C, the exit
status of the real command, environment variables read at import) runs in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import sigint_not_ignored

from fusion_bench.scripts.cli import main as fusion_bench_main

MINI = Path(__file__).resolve().parents[1] / "fusion_bench" / "assets" / "mini-clip"
FAST = ["taskpool=dummy"]  # no evaluation: the cases fail before it, or do not need it


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.strip().splitlines()


def _exit_code(exc: SystemExit) -> int:
    return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1


def cli(args: list[str], cwd: Path) -> Result:
    """``fusion_bench *args`` in this process, in ``cwd`` (where Hydra makes its run folders)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    out, err = io.StringIO(), io.StringIO()
    here, argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["fusion_bench", *args]  # main() reads the command line as the console script does
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                fusion_bench_main()
                code = 0
            except SystemExit as exc:
                code = _exit_code(exc)
    finally:
        os.chdir(here)
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    return Result(code, out.getvalue(), err.getvalue())


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (Hydra's ``outputs/`` run folders aside) and the folders."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "outputs":
            continue
        found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


@pytest.fixture()
def user(tmp_path: Path) -> Path:
    """A folder of a user's files next to which every case runs."""
    (tmp_path / "thesis.txt").write_text("years of work\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.md").write_text("notes\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("a file\n")
    return tmp_path


def bad_model_folder(tmp: Path, name: str, damage: str) -> Path:
    """A copy of a shipped mini CLIP expert, damaged: ``config`` (invalid JSON), ``extra`` (one
    more tensor), ``truncated`` (half a safetensors file), ``nan`` (a NaN weight)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp / name
    shutil.copytree(MINI / "clip-mini_scenes", folder)
    weights = folder / "model.safetensors"
    if damage == "config":
        (folder / "config.json").write_text('{"model_type": "clip_vision_model", ')
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        state = load_file(str(weights))
        if damage == "extra":
            state["stray.weight"] = state["post_layernorm.weight"].clone()
        else:
            key = "post_layernorm.weight"
            state[key] = state[key].clone()
            state[key][0] = math.nan
        save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def small_dataset(tmp: Path, *, truncated: bool = False) -> Path:
    """A saved 8-image dataset for the mini ``scenes`` task (whose ``.arrow`` file is cut in half if ``truncated``)."""
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(8)]
    data = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(8)]})
    path = tmp / "scenes_data"
    datasets.DatasetDict({"test": data}).save_to_disk(str(path))
    if truncated:
        (arrow,) = path.rglob("*.arrow")
        raw = arrow.read_bytes()
        arrow.write_bytes(raw[: len(raw) // 2])
    return path


def one_task(data: Path) -> list[str]:
    """Overrides: the mini benchmark's task pool with ``data`` as its only task, ``scenes``."""
    return [
        "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
        "~taskpool.test_datasets",
        f"+taskpool.test_datasets={{scenes: {{path: '{data}', split: test}}}}",
    ]


# (case id, extra arguments; {tmp} is the user's folder, regex the error line must match after
# "fusion_bench: error: ").  Every case exits 2 with that one line and changes no file.
CASES = [
    # Hydra's own errors, in our form, with a did-you-mean from the real keys
    (
        "typo-in-method-option",
        ["method=task_arithmetic", "method.scaling_factr=0.3"],
        r"unknown option 'method\.scaling_factr'; did you mean 'method\.scaling_factor'\?$",
    ),
    ("unknown-root-key", ["foo=1"], r"unknown option 'foo': the config has no such key"),
    ("typo-in-root-key", ["sed=1"], r"unknown option 'sed'; did you mean 'seed'\?$"),
    (
        "typo-in-nested-key",
        ["modelpool.modls.x=1"],
        r"unknown option 'modelpool\.modls\.x'; did you mean 'modelpool\.models'\?$",
    ),
    ("typo-in-fabric-key", ["fabric.device=2"], r"unknown option 'fabric\.device'; did you mean 'fabric\.devices'\?$"),
    ("delete-unknown-key", ["~sed"], r"unknown option 'sed'; did you mean 'seed'\?$"),
    (
        "unknown-config-name",
        ["--config-name", "nosuch"],
        r"unknown --config-name 'nosuch'\. Known: .*fusion_bench_config",
    ),
    (
        "typo-config-name",
        ["--config-name=fusion_bench_confg"],
        r"unknown --config-name 'fusion_bench_confg'; did you mean 'fusion_bench_config'\?",
    ),
    ("unknown-method", ["method=nope"], r"unknown method 'nope'\. Known: .*task_arithmetic"),
    ("typo-method", ["method=task_aritmetic"], r"unknown method 'task_aritmetic'\. Did you mean 'task_arithmetic'\?"),
    ("unknown-modelpool", ["modelpool=CLIPVisionModelPool/nope"], r"unknown modelpool 'CLIPVisionModelPool/nope'"),
    ("unknown-taskpool", ["taskpool=nope"], r"unknown taskpool 'nope'"),
    ("unknown-fabric", ["fabric=gpu8"], r"unknown fabric 'gpu8'"),
    ("unknown-method-in-sweep", ["-m", "method=task_arithmetic,nope"], r"unknown method 'nope'"),
    ("unparsable-override", ["seed='unterminated"], r"cannot parse \"seed='unterminated\": "),
    (
        "unparsable-list",
        ["method.scaling_factor=[1,"],
        r"cannot parse 'method\.scaling_factor=\[1,': no viable alternative at input",
    ),
    # devices
    ("zero-devices", ["fabric.devices=0"], r"option 'fabric\.devices' must be .*; got 0$"),
    ("negative-devices", ["fabric.devices=-3"], r"option 'fabric\.devices' must be .*; got -3$"),
    ("text-devices", ["fabric.devices=many"], r"option 'fabric\.devices' must be .*; got 'many'$"),
    (
        "unknown-accelerator",
        ["fabric.accelerator=quantum"],
        r"option 'fabric\.accelerator' must be one of auto, cpu, gpu.*; got 'quantum'$",
    ),
    (
        "unknown-strategy",
        ["fabric.strategy=nope"],
        r"fabric \(strategy='nope', accelerator='auto'\): You selected an invalid strategy name",
    ),
    (
        "fsdp-on-cpu",
        ["fabric.accelerator=cpu", "fabric.strategy=fsdp"],
        r"fabric \(strategy='fsdp', accelerator='cpu'\): .*FSDP",
    ),
    (
        "bad-precision",
        ["fabric.precision=77"],
        r"fabric \(strategy='auto', accelerator='auto'\): Precision 77 is invalid",
    ),
    (
        "flag-after-overrides",
        ["method=task_arithmetic", "method.scaling_factor=nan,0.3", "-m"],
        r"option 'method\.scaling_factor' must be a finite number; got nan$",
    ),
    # run options, parsed and range-checked up front
    ("seed-text", ["seed=abc"], r"option 'seed' must be an integer .*; got 'abc'$"),
    ("seed-negative", ["seed=-1"], r"option 'seed' must be an integer .*; got -1$"),
    ("seed-float", ["seed=1.5"], r"option 'seed' must be an integer .*; got 1\.5$"),
    ("seed-nan", ["seed=nan"], r"option 'seed' must be an integer .*; got nan$"),
    (
        "fast-dev-run-text",
        ["fast_dev_run=abc"],
        r"option 'fast_dev_run' must be true, false or a number of batches >= 1; got 'abc'$",
    ),
    ("fast-dev-run-zero", ["fast_dev_run=0"], r"option 'fast_dev_run' must be .*; got 0$"),
    ("fast-dev-run-negative", ["fast_dev_run=-2"], r"option 'fast_dev_run' must be .*; got -2$"),
    ("print-config-text", ["print_config=maybe"], r"option 'print_config' must be true or false; got 'maybe'$"),
    ("overwrite-text", ["overwrite=please"], r"option 'overwrite' must be true or false; got 'please'$"),
    ("skip-existing-text", ["skip_existing_report=abc"], r"skip_existing_report must be true or false, got 'abc'$"),
    ("checkpoint-hash-unknown", ["checkpoint_hash=md5"], r"checkpoint_hash must be one of .*, got 'md5'$"),
    (
        "batch-size-inf",
        ["taskpool=CLIPVisionModelTaskPool/mini-clip_TA8", "taskpool.dataloader_kwargs.batch_size=inf"],
        r"option 'taskpool\.dataloader_kwargs\.batch_size' must be a finite number; got inf$",
    ),
    (
        "batch-size-text",
        ["taskpool=CLIPVisionModelTaskPool/mini-clip_TA8", "taskpool.dataloader_kwargs.batch_size=abc"],
        r"option 'taskpool\.dataloader_kwargs\.batch_size' must be an integer >= 1; got 'abc'$",
    ),
    (
        "num-workers-negative",
        ["taskpool=CLIPVisionModelTaskPool/mini-clip_TA8", "taskpool.dataloader_kwargs.num_workers=-1"],
        r"option 'taskpool\.dataloader_kwargs\.num_workers' must be an integer >= 0; got -1$",
    ),
    (
        "report-path-a-list",
        ["report_save_path=[1,2]"],
        r"report_save_path must be a path, or null/false for none; got \[1, 2\]$",
    ),
    (
        "model-path-a-number",
        ["merged_model_save_path=123"],
        r"merged_model_save_path must be a path, or null/false for none; got 123$",
    ),
    # method options: numbers, finite, in range
    (
        "scaling-factor-nan",
        ["method=task_arithmetic", "method.scaling_factor=nan"],
        r"option 'method\.scaling_factor' must be a finite number; got nan$",
    ),
    (
        "scaling-factor-inf",
        ["method=task_arithmetic", "method.scaling_factor=inf"],
        r"option 'method\.scaling_factor' must be a finite number; got inf$",
    ),
    (
        "scaling-factor-minus-inf",
        ["method=task_arithmetic", "method.scaling_factor=-inf"],
        r"option 'method\.scaling_factor' must be a finite number; got -inf$",
    ),
    (
        "scaling-factor-text",
        ["method=task_arithmetic", "method.scaling_factor=abc"],
        r"task_arithmetic: option 'scaling_factor' must be a number; got 'abc'$",
    ),
    (
        "ties-scaling-text",
        ["method=ties_merging", "method.scaling_factor=abc"],
        r"ties_merging: option 'scaling_factor' must be a number; got 'abc'$",
    ),
    (
        "ties-threshold-nan",
        ["method=ties_merging", "method.threshold=nan"],
        r"option 'method\.threshold' must be a finite number; got nan$",
    ),
    (
        "dare-sparsity-out-of-range",
        ["method=dare/task_arithmetic", "method.sparsity_ratio=1.5"],
        r"dare_task_arithmetic: option 'sparsity_ratio' must be in \[0, 1\) \(the probability of dropping each entry\); got 1\.5$",
    ),
    (
        "scaling-factor-overflow",
        ["method=task_arithmetic", "method.scaling_factor=1e400"],
        r"option 'method\.scaling_factor' must be a finite number; got inf$",
    ),
    (
        "ties-threshold-out-of-range",
        ["method=ties_merging", "method.threshold=150"],
        r"ties_merging: option 'threshold' must be in \(0, 100\]",
    ),
    (
        "breadcrumbs-beta-text",
        ["method=model_breadcrumbs", "method.beta=abc"],
        r"model_breadcrumbs: option 'beta' must be a number; got 'abc'$",
    ),
    ("lines-beta-nan", ["method=lines", "method.beta=nan"], r"option 'method\.beta' must be a finite number; got nan$"),
    (
        "dare-seed-negative",
        ["method=dare/task_arithmetic", "method.seed=-5"],
        r"dare_task_arithmetic: option 'seed' must be an integer >= 0; got -5$",
    ),
    (
        "adamerging-optimizer-unknown",
        ["method=adamerging", "method.optimizer=rmsprop"],
        r"clip_layer_wise_adamerging: option 'optimizer' must be one of 'adam', 'sgd'; got 'rmsprop'$",
    ),
    (
        "pcb-ratio-out-of-range",
        ["method=pcb_merging", "method.pcb_ratio=2"],
        r"pcb_merging: option 'pcb_ratio' must be in \(0, 1\]",
    ),
    ("model-entry-a-number", ["modelpool.models.scenes=3"], r"model 'scenes': expected a path or a mapping, got 3$"),
    (
        "adamerging-lr-zero",
        ["method=adamerging", "method.lr=0"],
        r"clip_layer_wise_adamerging: option 'lr' must be in \(0, inf\]; got 0$",
    ),
    (
        "adamerging-steps-zero",
        ["method=adamerging", "method.max_steps=0"],
        r"clip_layer_wise_adamerging: option 'max_steps' must be an integer >= 1; got 0$",
    ),
    (
        "adamerging-lr-text",
        ["method=adamerging", "method.lr=fast"],
        r"clip_layer_wise_adamerging: option 'lr' must be a number; got 'fast'$",
    ),
    (
        "weighted-average-weights-inf",
        ["method=weighted_average", "method.weights=[1,inf,1,1,1,1,1,1]"],
        r"option 'method\.weights\[1\]' must be a finite number; got inf$",
    ),
    # output paths, checked before any work
    (
        "report-under-a-file",
        ["report_save_path={tmp}/afile/r.json"],
        r"report_save_path='.*/afile/r\.json': '.*/afile' is a file, so nothing can be written under it$",
    ),
    (
        "report-in-proc",
        ["report_save_path=/proc/fusion_bench_report.json"],
        r"report_save_path='/proc/fusion_bench_report\.json': folder '/proc' is not writable$",
    ),
    (
        "report-is-a-folder",
        ["report_save_path={tmp}/results"],
        r"report_save_path='.*/results' is an existing folder; give a file path$",
    ),
    (
        "report-over-a-user-file",
        ["report_save_path={tmp}/thesis.txt"],
        r"report_save_path='.*/thesis\.txt' is an existing file that is not a FusionBench report; .*overwrite=true",
    ),
    (
        "model-into-a-users-folder",
        ["merged_model_save_path={tmp}/results"],
        r"merged_model_save_path='.*/results' holds files FusionBench did not write \('notes\.md'\); .*overwrite=true",
    ),
    (
        "model-over-a-file",
        ["merged_model_save_path={tmp}/afile"],
        r"merged_model_save_path='.*/afile' is an existing file; a folder would replace it",
    ),
    (
        "model-into-cwd",
        ["merged_model_save_path=."],
        r"merged_model_save_path='\.' holds files FusionBench did not write",
    ),
    (
        "model-under-a-file",
        ["merged_model_save_path={tmp}/afile/model"],
        r"merged_model_save_path=.*'.*/afile' is a file, so nothing can be written under it$",
    ),
    (
        "model-in-proc",
        ["merged_model_save_path=/proc/fusion_bench_model"],
        r"merged_model_save_path='/proc/fusion_bench_model': folder '/proc' is not writable$",
    ),
    (
        "csv-is-a-folder",
        ["method=task_vector_cos_similarity", "method.save_to_csv={tmp}/results"],
        r"method\.save_to_csv='.*/results' is an existing folder; give a file path$",
    ),
    (
        "csv-under-a-file",
        ["method=task_vector_cos_similarity", "method.save_to_csv={tmp}/afile/m.csv"],
        r"method\.save_to_csv=.*'.*/afile' is a file",
    ),
    (
        "weights-file-is-a-folder",
        ["method=adamerging", "method.save_merging_weights={tmp}/results"],
        r"method\.save_merging_weights='.*/results' is an existing folder",
    ),
    (
        "checkpoint-dir-is-a-file",
        ["method=adamerging", "method.checkpoint_dir={tmp}/afile"],
        r"method\.checkpoint_dir='.*/afile' is an existing file; give a folder$",
    ),
    (
        "mask-file-is-a-folder",
        ["method=concrete_subspace/clip_concrete_task_arithmetic", "method.save_mask={tmp}/empty"],
        r"method\.save_mask='.*/empty' is an existing folder",
    ),
    (
        "regmean-checkpoint-is-a-folder",
        ["method=regmean/clip_regmean", "method.checkpoint_path={tmp}/results"],
        r"method\.checkpoint_path='.*/results' is an existing folder",
    ),
    (
        "finetune-model-into-users-folder",
        ["method=clip_finetune", "method.save_path={tmp}/results"],
        r"method\.save_path='.*/results' holds files FusionBench did not write",
    ),
    (
        "csv-in-proc",
        ["method=task_vector_cos_similarity", "method.save_to_csv=/proc/x.csv"],
        r"method\.save_to_csv='/proc/x\.csv': folder '/proc' is not writable$",
    ),
    (
        "log-dir-in-proc",
        ["method=image_classification_finetune", "method.log_dir=/proc/fb_logs"],
        r"method\.log_dir='/proc/fb_logs': folder '/proc' is not writable$",
    ),
]


@pytest.mark.parametrize("case, args, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_file_changes(user, case, args, message):
    before = digests(user)
    result = cli([*FAST, *(a.format(tmp=user) for a in args)], cwd=user)
    assert result.code == 2, result.err
    assert len(result.lines) == 1, result.err
    assert re.match(r"fusion_bench: error: " + message, result.lines[0]), result.lines[0]
    assert digests(user) == before
    assert not list(user.rglob("report.json")) and not list(user.rglob("*.tmp"))


def test_gpu_accelerator_without_a_gpu(user):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli([*FAST, "fabric.accelerator=gpu"], cwd=user)
    assert result.code == 2 and len(result.lines) == 1, result.err
    assert result.lines[0] == (
        "fusion_bench: error: option 'fabric.accelerator=gpu': no CUDA GPU is available on this "
        "machine; use fabric.accelerator=cpu or auto"
    )


MODEL_CASES = [
    ("config", "mnist", r"model 'scenes' \(.*/bad\): '.*/bad/config\.json' is not valid JSON \(Expecting"),
    (
        "extra",
        "_pretrained_",
        r"model '_pretrained_' has unexpected tensor\(s\) \['stray\.weight'\] that the other models lack$",
    ),
    ("extra", "scenes", r"model 'scenes' has unexpected tensor\(s\) \['stray\.weight'\] that the other models lack$"),
    ("truncated", "scenes", r"model 'scenes'.*/bad.*model\.safetensors"),
    ("nan", "scenes", r"model 'scenes', tensor 'post_layernorm\.weight' contains NaN"),
]


@pytest.mark.parametrize("damage, model, message", MODEL_CASES, ids=[f"{d}-{m}" for d, m, _ in MODEL_CASES])
def test_damaged_model_names_model_and_path(user, damage, model, message):
    bad = bad_model_folder(user, "bad", damage)
    model = "scenes" if model == "mnist" else model
    before = digests(user)
    out = user / "merged"
    result = cli(
        [
            "method=task_arithmetic",
            *FAST,
            f"modelpool.models.{model}.pretrained_model_name_or_path={bad}",
            f"merged_model_save_path={out}",
            f"report_save_path={user}/r.json",
        ],
        cwd=user,
    )
    assert result.code == 2 and len(result.lines) == 1, result.err
    assert re.match(r"fusion_bench: error: " + message, result.lines[0]), result.lines[0]
    assert digests(user) == before and not out.exists() and not (user / "r.json").exists()


def test_missing_model_path(user):
    result = cli(
        ["method=task_arithmetic", *FAST, f"modelpool.models.scenes.pretrained_model_name_or_path={user}/nowhere"],
        cwd=user,
    )
    assert result.code == 2 and result.lines == [
        f"fusion_bench: error: model 'scenes': path '{user}/nowhere' does not exist"
    ]


def test_truncated_dataset_names_task_and_path(user):
    data = small_dataset(user, truncated=True)
    before = digests(user)
    result = cli(["method=dummy", *one_task(data), f"report_save_path={user}/r.json"], cwd=user)
    assert result.code == 2 and len(result.lines) == 1, result.err
    assert re.match(
        rf"fusion_bench: error: test dataset 'scenes': cannot read the saved dataset '{re.escape(str(data))}' \(",
        result.lines[0],
    )
    assert digests(user) == before and not (user / "r.json").exists()


def test_python_api_refuses_non_finite_and_non_numbers():
    from fusion_bench.errors import ConfigError
    from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm

    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConfigError, match=r"task_arithmetic: option 'scaling_factor' must be a finite number"):
            TaskArithmeticAlgorithm(scaling_factor=value)
        with pytest.raises(ConfigError, match=r"option 'scaling_factor' must be a finite number"):
            TiesMergingAlgorithm(scaling_factor=value)
    with pytest.raises(ConfigError, match=r"task_arithmetic: option 'scaling_factor' must be a number; got 'abc'"):
        TaskArithmeticAlgorithm(scaling_factor="abc")
    assert TaskArithmeticAlgorithm(scaling_factor=1).scaling_factor == 1.0


def test_non_finite_report_is_refused_at_the_source(user, monkeypatch):
    from fusion_bench.taskpool.dummy import DummyTaskPool

    monkeypatch.setattr(DummyTaskPool, "evaluate", lambda self, model: {"task": {"accuracy": 0.5, "loss": math.nan}})
    result = cli(["method=dummy", "taskpool=dummy", f"report_save_path={user}/r.json"], cwd=user)
    assert result.code == 2 and result.lines == [
        "fusion_bench: error: report.task.loss is nan, which JSON cannot hold: the run produced a non-finite number; no report written"
    ], result.err
    assert not (user / "r.json").exists()


def test_pickle_refusal_is_plain_text_and_whole(tmp_path):
    import torch

    from fusion_bench.models.torch_files import PickleRequiredError, load_state_dict_file

    torch.save({"weights": Path("not a tensor")}, tmp_path / "p.pt")
    with pytest.raises(PickleRequiredError) as info:
        load_state_dict_file(tmp_path / "p.pt", what="model 'x'")
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message
    assert message.endswith("or convert it once to safetensors (it needs global: pathlib.PosixPath)"), message


# ---- what a run writes ---------------------------------------------------------------------------


def test_model_save_replaces_only_its_own_files_and_cleans_stale_temporaries(user):
    out = user / "merged"
    args = ["method=task_arithmetic", *FAST, f"merged_model_save_path={out}", "report_save_path=false"]
    old = os.umask(0o022)
    try:
        assert cli(args, cwd=user).code == 0
        first = digests(out)
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = user / f".merged.{dead.pid}.k9k9.tmp"  # what a run killed (-9) while saving leaves
        stale.mkdir()
        (stale / "model.safetensors").write_bytes(b"\0" * 1000)
        again = cli([*args, "method.scaling_factor=0.5"], cwd=user)
        assert again.code == 0, again.err
    finally:
        os.umask(old)
    assert not stale.exists()
    assert set(digests(out)) == set(first) and digests(out)["model.safetensors"] != first["model.safetensors"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # the umask's modes, not tempfile's 0700/0600
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    (out / "thesis.txt").write_text("mine\n")
    refused = cli(args, cwd=user)
    assert refused.code == 2 and "holds files FusionBench did not write ('thesis.txt')" in refused.lines[0]
    kept = cli([*args, "overwrite=true"], cwd=user)
    assert kept.code == 0, kept.err
    assert (out / "thesis.txt").read_text() == "mine\n"


def test_report_is_strict_json_summary_on_stdout_and_json_flag(user):
    report = user / "r.json"
    result = cli(["method=task_arithmetic", *FAST, f"report_save_path={report}"], cwd=user)
    assert result.code == 0, result.err
    saved = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert result.out.strip().splitlines()[-1].startswith("model: 213,632 parameters;")
    assert f"report: {report}" in result.out and "{" not in result.out
    assert stat.S_IMODE(report.stat().st_mode) == 0o666 & ~_umask()
    printed = cli(["method=task_arithmetic", *FAST, f"report_save_path={report}", "--json"], cwd=user)
    assert printed.code == 0, printed.err
    assert json.loads(printed.out)["model_info"] == saved["model_info"]
    assert "report:" in printed.err  # the summary moved to stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_summary_table():
    from fusion_bench.program.summary import summary_lines

    lines = summary_lines(
        {
            "model_info": {"all_params": 10},
            "a": {"accuracy": 0.5, "loss": 1.0},
            "b": {"accuracy": 0.25},
            "average": {"accuracy": 0.375},
            "meta": {"wall_seconds": 2.0},
        },
        "out/report.json",
    )
    assert lines == [
        "task     accuracy      loss",
        "a          50.00%    1.0000",
        "b          25.00%          ",
        "-" * 27,
        "average    37.50%          ",
        "model: 10 parameters; 2.0 s; report: out/report.json",
    ]


def test_default_report_goes_to_the_run_folder(user):
    result = cli(["method=dummy", *FAST], cwd=user)
    assert result.code == 0, result.err
    (report,) = (user / "outputs" / "runs").glob("*/report.json")
    assert f"report: {report}" in result.out and json.loads(report.read_text())["model_info"]["all_params"] == 213632


def test_evaluation_quiet_when_not_a_terminal_ends_with_the_summary_table(user):
    data = small_dataset(user)
    result = cli(["method=task_arithmetic", *one_task(data), f"report_save_path={user}/r.json"], cwd=user)
    assert result.code == 0, result.err
    assert "it/s" not in result.err and "Loading weights" not in result.err and "%|" not in result.err
    report = json.loads((user / "r.json").read_text())
    lines = result.out.strip().splitlines()
    assert lines[0].split() == ["task", "accuracy", "loss"]
    assert lines[1].split() == [
        "scenes",
        f"{100 * report['scenes']['accuracy']:.2f}%",
        f"{report['scenes']['loss']:.4f}",
    ]
    assert lines[3].split()[:2] == ["average", f"{100 * report['average']['accuracy']:.2f}%"]
    assert lines[4].startswith("model: 213,632 parameters; ") and lines[4].endswith(f"report: {user}/r.json")


def test_help_starts_with_usage_and_the_options_that_matter(user):
    result = cli(["--help"], cwd=user)
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].startswith("usage: fusion_bench ")
    options = lines[lines.index("options that matter:") + 1 : lines.index("", lines.index("options that matter:"))]
    assert 10 <= len(options) <= 14
    for option in ("method=", "report_save_path=", "merged_model_save_path=", "overwrite=true", "--json"):
        assert any(line.strip().startswith(option) for line in options), option
    groups = lines.index("config groups (group=choice):")
    assert groups > lines.index("options that matter:")
    assert any(line.startswith("  method: ") and "task_arithmetic" in line for line in lines[groups:])


def test_sweep_job_folders_are_one_short_level(user):
    models = [MINI / "clip-mini_scenes", MINI / "clip-mini_vehicles"]
    sweep = user / "sweep"
    result = cli(
        [
            "-m",
            "method=dummy",
            "modelpool=CLIPVisionModelPool/mini-clip_individual",
            *FAST,
            "modelpool.models._pretrained_.pretrained_model_name_or_path=" + ",".join(map(str, models)),
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=user,
    )
    assert result.code == 0, result.err
    reports = sorted(p.relative_to(sweep) for p in sweep.rglob("report.json"))
    assert len(reports) == 2 and all(len(r.parts) == 2 for r in reports)  # <job folder>/report.json
    names = [r.parts[0] for r in reports]
    assert all(len(n) <= 200 and re.fullmatch(r"[\w.=,+~-]+", n) for n in names) and names[0] != names[1], names


def test_job_dir_name_rules():
    from fusion_bench.program.hydra_job import job_dir_name

    assert (
        job_dir_name("method.scaling_factor=0.2,method=task_arithmetic")
        == "method.scaling_factor=0.2,method=task_arithmetic"
    )
    assert job_dir_name("modelpool=CLIPVisionModelPool/mini-clip_TA8") == "modelpool=CLIPVisionModelPool.mini-clip_TA8"
    a, b = job_dir_name("m.path=/data/a/model,seed=1"), job_dir_name("m.path=/other/a/model,seed=1")
    assert a.startswith("m.path=model-") and a.endswith(",seed=1") and "/" not in a and a != b
    long = job_dir_name("x=" + "v" * 400)
    assert len(long) == 200 and long != job_dir_name("x=" + "v" * 399)
    assert job_dir_name("") == "default"


# ---- fusion_bench_report ---------------------------------------------------------------------------


def _report_cli(args: list[str]) -> Result:
    from fusion_bench.scripts.report import main as report_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            report_main(args)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc)
    return Result(code, out.getvalue(), err.getvalue())


def _a_report(accuracy: float) -> dict:
    return {
        "t": {"accuracy": accuracy},
        "meta": {"config": {"method": {"_target_": "x.TaskArithmetic", "scaling_factor": 0.3}}},
    }


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"t": {"accuracy": 0.5}', r"'.*/broken\.json' is not valid JSON \(Expecting .*\); fix or remove it$"),
        (
            '{"t": {"accuracy": NaN}}',
            r"'.*/broken\.json' is not valid JSON \(NaN is not a JSON number\); fix or remove it$",
        ),
        ("", r"'.*/broken\.json' is not valid JSON"),
    ],
    ids=["truncated", "nan", "empty"],
)
def test_report_command_does_not_skip_invalid_json(tmp_path, content, message):
    (tmp_path / "good.json").write_text(json.dumps(_a_report(0.5)))
    (tmp_path / "broken.json").write_text(content)
    before = digests(tmp_path)
    result = _report_cli([str(tmp_path), "--no-figures"])
    assert result.code == 2 and len(result.lines) == 1, result.err
    assert re.match(r"fusion_bench_report: error: " + message, result.lines[0]), result.lines[0]
    assert digests(tmp_path) == before


def test_report_command_missing_path(tmp_path):
    result = _report_cli([str(tmp_path / "nowhere")])
    assert result.code == 2 and result.lines == [
        f"fusion_bench_report: error: no such file or folder: '{tmp_path / 'nowhere'}'"
    ]


# ---- the process itself: exit status, Ctrl-C, the hub ----------------------------------------------


def _command(args: list[str], cwd: Path, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fusion_bench", *args],
        cwd=cwd,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_ctrl_c_is_one_line_exit_130_and_no_report(user):
    report = user / "r.json"
    # A run that cannot end before the interrupt, so the test does not depend on the machine's speed.
    args = [
        "method=adamerging",
        "method.max_steps=1000000",
        "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
        f"report_save_path={report}",
    ]
    with sigint_not_ignored():
        proc = _command(args, user)
    try:
        deadline = time.monotonic() + 120
        while not list((user / "outputs").glob("runs/*")) and time.monotonic() < deadline:  # the run has started
            time.sleep(0.05)
        time.sleep(3.0)  # past the options' checks (about 1 s after the run folder appears), into the work
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never leave the 10^6-step run behind (a no-op once it has exited)
        proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["fusion_bench: interrupted (Ctrl-C); no report written"], err
    assert not report.exists() and not list(user.glob(".r.json.*"))


def test_unreachable_hub_fails_at_once_without_retries(user):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: unreachable
    started = time.monotonic()
    proc = _command(
        [
            "method=task_arithmetic",
            *FAST,
            "modelpool.models.scenes.pretrained_model_name_or_path=someone/no-such-model",
        ],
        user,
        env=env,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fusion_bench: error: model 'scenes' (someone/no-such-model)"), err
    assert out == "" and time.monotonic() - started < 30  # the process's own exit status 2; no 25 s of retries


def test_an_interrupt_that_python_wrapped_is_still_one_line_exit_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C inside a class body reaches us as a RuntimeError caused by the KeyboardInterrupt (Python wraps
    exceptions raised in ``__set_name__``): still the interrupt's one line and exit 130, not Hydra's traceback."""
    from fusion_bench.program import FabricModelFusionProgram
    from fusion_bench.scripts import cli

    def interrupted_run(self):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance 'ret' in 'Op'") from err

    monkeypatch.setattr(FabricModelFusionProgram, "run", interrupted_run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["method=dummy", "taskpool=dummy", f"report_save_path={tmp_path / 'r.json'}"])
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["fusion_bench: interrupted (Ctrl-C); no report written"]
    assert not (tmp_path / "r.json").exists()
