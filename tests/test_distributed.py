"""Data parallelism on CPU (DDP over gloo, 2 processes): evaluation equals one device's, and
``shard_batch`` + ``fabric.backward`` give the full batch's gradient."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli

from fusion_bench.errors import ConfigError
from fusion_bench.program.hydra_job import check_process_launch
from fusion_bench.utils.distributed import ShardSampler, shard_batch, sum_across_ranks

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


def test_cli_two_processes_report_what_one_device_reports(tiny_example, tmp_path):
    """A multirun of two DDP jobs (each job's processes must get that job alone; the second job must
    not take the first one's leftover process variables for its own)."""
    from transformers import CLIPVisionModel

    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    # batch 7: each rank's 20 samples per task come in batches 7, 7, 6 (one device: 7 x 5, then 5);
    # fast_dev_run: the first batch of 7 samples, 4 on rank 0 and 3 on rank 1
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "method=dummy",
        *TINY,
        "taskpool.dataloader_kwargs.batch_size=7",
        "fast_dev_run=false,true",
        "fabric.accelerator=cpu",
        "fabric.devices=2",
        "fabric.strategy=ddp",
        f"hydra.sweep.dir={sweep}",
    ]
    two = run_cli(args, cwd=tmp_path, fresh_process=True)  # ddp re-runs the command line
    assert two.returncode == 0, two.stderr
    reports = {r["meta"]["fast_dev_run"]: r for r in (json.loads(p.read_text()) for p in sweep.rglob("report.json"))}
    assert set(reports) == {False, True}
    model = CLIPVisionModel.from_pretrained(tiny_example.base_model)
    for fast, report in reports.items():
        one_device = CLIPVisionModelTaskPool(
            test_datasets={t: str(p) for t, p in tiny_example.datasets.items()},
            clip_model=str(tiny_example.base_model),
            head_cache_dir=None,
            dataloader_kwargs={"batch_size": 7},
            fast_dev_run=fast,
        )
        expected = one_device.evaluate(model)
        for task in [*tiny_example.datasets, "average"]:
            assert report[task]["accuracy"] == expected[task]["accuracy"]
            assert report[task]["loss"] == pytest.approx(
                expected[task]["loss"], rel=1e-6
            )  # float32 logits, other batches
        assert (
            report["meta"]["num_samples"]
            == one_device.evaluation_meta()["num_samples"]
            == {t: 7 if fast else 40 for t in tiny_example.datasets}
        )
        assert report["meta"]["world_size"] == 2 and report["meta"]["device"]["world_size"] == 2
        assert len(report["meta"]["peak_memory"]["peak_rss_mib"]) == 2  # one value per rank
    assert len(re.findall(r"^average +\d", two.stdout, re.M)) == 2  # rank 0 alone prints each job's summary


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(shards, [])) == list(range(11)) and len(ShardSampler(11, rank=2, world_size=3)) == 3


def test_one_process_helpers_are_the_identity():
    batch = (torch.arange(5.0), torch.arange(5))
    assert shard_batch(batch, None) == (batch, 1.0)
    assert sum_across_ranks(None, [3, 0.5]) == [3.0, 0.5]


def _ddp_gradient(fabric, inputs, targets):
    """Rank's share of the batch, weighted local mean loss, DDP backward; returns the gradient and sums."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    (x, y), weight = shard_batch((inputs, targets), fabric)
    loss = weight * ((model(x).squeeze(-1) - y) ** 2).mean()
    fabric.backward(loss)
    counts = sum_across_ranks(fabric, [len(y), float(y.sum())])
    grads = [p.grad.tolist() for p in model.parameters()]  # lists: tensors cannot cross
    fabric.barrier()  # close the group as the program does: a worker that exits with gloo's threads alive aborts
    torch.distributed.destroy_process_group()
    return grads, counts, fabric.global_rank


def test_shard_batch_gradient_equals_full_batch_on_two_processes(tmp_path):
    import lightning

    inputs, targets = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)), torch.arange(5.0)  # 5 rows: 2 + 3
    fabric = lightning.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    grads, counts, rank = fabric.launch(_ddp_gradient, inputs, targets)  # rank 0's result
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    ((model(inputs).squeeze(-1) - targets) ** 2).mean().backward()
    assert rank == 0 and counts == [5.0, 10.0]
    for got, expected in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-6, atol=1e-7)


def test_unsupported_process_launch_is_a_config_error():
    import lightning

    with pytest.raises(
        ConfigError,
        match=r"fabric.strategy: DDPStrategy \(_MultiProcessingLauncher\) is not supported; use strategy=ddp",
    ):
        check_process_launch(lightning.Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn"))
    with pytest.raises(ConfigError, match=r"re-runs the fusion_bench command per device, which cannot be done from"):
        check_process_launch(
            lightning.Fabric(accelerator="cpu", devices=2, strategy="ddp")
        )  # pytest is not fusion_bench
    check_process_launch(lightning.Fabric(accelerator="cpu", devices=1))  # nothing to start
