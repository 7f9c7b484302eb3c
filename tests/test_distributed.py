"""Two CPU processes with gloo on 127.0.0.1: SyncBatchNormMish2d against the full-batch BatchNorm2d + Mish,
and DDP training through ``cspmirror train`` (as under torchrun) against one process on the whole batch.

The two processes are spawned once per module (``ddp_results``); the tests then compare what they wrote.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cspmirror import get_model
from cspmirror.layers import BatchNormMish2d
from cspmirror.sync_bn import SyncBatchNormMish2d, combine_moments, convert_sync_batchnorm
from cspmirror.train.history import read_csv

WORLD = 2
SIZES = (3, 5)  # uneven per-rank batches: the statistics must be count-weighted
CHANNELS = 6
TIMEOUT_S = 180
# 48 synthetic images, global batch 16 (8 per rank): 3 optimizer steps, then validation on 20 images.
TRAIN_ARGS = ["train", "--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "48",
              "--synthetic-val", "20", "--synthetic-classes", "3", "--batch-size", "16", "--epochs", "1",
              "--workers", "0", "--seed", "7", "--no-progress", "--device", "cpu"]


def _free_ports(n: int) -> tuple[int, ...]:
    """``n`` distinct free ports (all sockets are held open until every port is chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in sockets)


def _syncbn_inputs() -> dict[str, torch.Tensor]:
    """The full batch and parameters, identical in every process (seeded)."""
    g = torch.Generator().manual_seed(11)
    n = sum(SIZES)
    shape = (n, CHANNELS, 5, 4)
    return dict(x=torch.randn(shape, generator=g) * 3 + 1, residual=torch.randn(shape, generator=g),
                grad=torch.randn(shape, generator=g), weight=torch.rand(CHANNELS, generator=g) + 0.5,
                bias=torch.randn(CHANNELS, generator=g))


def _syncbn_check(rank: int, out: Path) -> None:
    """This rank's slice through SyncBatchNormMish2d (with residual), forward and backward, saved to disk;
    also inside ``torch.utils.checkpoint``."""
    t = _syncbn_inputs()
    lo = sum(SIZES[:rank])
    part = slice(lo, lo + SIZES[rank])
    torch.save(_syncbn_step(t, part, lambda bn, x, r: bn(x, r)), out / f"syncbn{rank}.pt")
    torch.save(_syncbn_step(t, part, lambda bn, x, r: checkpoint(bn, x, r, use_reentrant=False)),
               out / f"syncbn_checkpointed{rank}.pt")
    # One value per channel over the whole group (1 + 0 samples of 1x1): BatchNorm's degenerate case.
    try:
        SyncBatchNormMish2d(3).train()(torch.randn(1 - rank, 3, 1, 1))
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    (out / f"syncbn_one_value{rank}.txt").write_text(message)


def _syncbn_step(t: dict[str, torch.Tensor], part: slice, forward) -> dict[str, torch.Tensor]:
    bn = SyncBatchNormMish2d(CHANNELS).train()
    with torch.no_grad():
        bn.weight.copy_(t["weight"])
        bn.bias.copy_(t["bias"])
    x = t["x"][part].clone().requires_grad_(True)
    residual = t["residual"][part].clone().requires_grad_(True)
    y = forward(bn, x, residual)
    (y * t["grad"][part]).sum().backward()
    return dict(y=y.detach(), gx=x.grad, gr=residual.grad, gw=bn.weight.grad, gb=bn.bias.grad,
                running_mean=bn.running_mean, running_var=bn.running_var, steps=bn.num_batches_tracked)


def _worker(rank: int, ports: tuple[int, ...], out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=WORLD)
    try:
        _syncbn_check(rank, Path(out))
    finally:
        dist.destroy_process_group()
    # What torchrun does: the environment describes the group, `cspmirror train` joins it (env://).
    from cspmirror.cli import main

    # Each run gets its own store port: a rank that leaves the first group early could otherwise reach rank
    # 0's old store, not yet closed, and both would wait for each other (seen as a rare CI hang).
    for port, name, extra in ((ports[1], "ddp", []), (ports[2], "ddp_no_sync_bn", ["--no-sync-bn"])):
        os.environ["MASTER_PORT"] = str(port)
        code = main([*TRAIN_ARGS, *extra, "--output", str(Path(out) / name)])
        if code != 0:
            raise RuntimeError(f"rank {rank}: cspmirror train {' '.join(extra)} exited with {code}")
    _ablate_with_slow_rank0(rank, ports[3], out)


def _ablate_with_slow_rank0(rank: int, port: int, out: str) -> None:
    """``cspmirror ablate`` with two points, rank 0 slow to close its store: a process that left and re-joined
    the group per point would reach that old store and the ablation would hang or fail."""
    from cspmirror.cli import main

    os.environ["MASTER_PORT"] = str(port)
    destroy = dist.destroy_process_group

    def slow_destroy(*args, **kwargs):
        if rank == 0:
            time.sleep(1.0)
        destroy(*args, **kwargs)

    dist.destroy_process_group = slow_destroy
    try:
        code = main(["ablate", *TRAIN_ARGS[1:], "--grid", "overlap=0,0.25", "--output", str(Path(out) / "ablate")])
    finally:
        dist.destroy_process_group = destroy
    if code != 0:
        raise RuntimeError(f"rank {rank}: cspmirror ablate exited with {code}")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_worker, args=(_free_ports(4), str(out)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {WORLD} spawned processes did not finish within {TIMEOUT_S} s")
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    err = (a - b).abs().max().item()
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"{what}: max abs err {err:.3g}"


# ------------------------------------------------------------------------------------------- SyncBN op


def test_sync_bn_mish_matches_full_batch_bn_mish(ddp_results):
    """Forward, input / residual / weight / bias gradients and running stats equal BatchNorm2d + Mish on
    the concatenated batch (what torch.nn.SyncBatchNorm computes too)."""
    t = _syncbn_inputs()
    ref_bn = torch.nn.BatchNorm2d(CHANNELS).train()
    with torch.no_grad():
        ref_bn.weight.copy_(t["weight"])
        ref_bn.bias.copy_(t["bias"])
    x = t["x"].clone().requires_grad_(True)
    residual = t["residual"].clone().requires_grad_(True)
    y_ref = F.mish(ref_bn(x)) + residual
    (y_ref * t["grad"]).sum().backward()

    ranks = [torch.load(ddp_results / f"syncbn{r}.pt", weights_only=True) for r in range(WORLD)]
    _close(torch.cat([r["y"] for r in ranks]), y_ref.detach(), "forward")
    _close(torch.cat([r["gx"] for r in ranks]), x.grad, "grad x", rtol=1e-4, atol=1e-5)
    _close(torch.cat([r["gr"] for r in ranks]), residual.grad, "grad residual")
    # weight / bias gradients stay local (DDP averages them); their sum is the full-batch gradient
    _close(sum(r["gw"] for r in ranks), ref_bn.weight.grad, "grad weight", rtol=1e-4, atol=1e-5)
    _close(sum(r["gb"] for r in ranks), ref_bn.bias.grad, "grad bias", rtol=1e-4, atol=1e-5)
    for r in ranks:
        _close(r["running_mean"], ref_bn.running_mean, "running_mean")
        _close(r["running_var"], ref_bn.running_var, "running_var")


def test_sync_bn_mish_under_checkpoint_is_the_same_step(ddp_results):
    """Recomputed in the backward (a second all-reduce), with the running statistics counted once."""
    for rank in range(WORLD):
        plain = torch.load(ddp_results / f"syncbn{rank}.pt", weights_only=True)
        checkpointed = torch.load(ddp_results / f"syncbn_checkpointed{rank}.pt", weights_only=True)
        assert int(plain["steps"]) == int(checkpointed["steps"]) == 1
        for name, value in plain.items():
            assert torch.equal(value, checkpointed[name]), (rank, name)


def test_sync_bn_one_value_per_channel_over_the_group_raises(ddp_results):
    """As nn.BatchNorm2d: else the unbiased running_var would be 0/0, a NaN written with no error."""
    for rank in range(WORLD):
        message = (ddp_results / f"syncbn_one_value{rank}.txt").read_text()
        assert message.startswith("Expected more than 1 value per channel when training, got 1"), message


def test_combine_moments_is_exact():
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64) * 5 + 2
    rows = []
    for part in (x[:1], x[1:3], x[3:]):
        var, mean = torch.var_mean(part, dim=(0, 2, 3), correction=0)
        n = part.numel() // 3
        rows.append(torch.cat([torch.tensor([float(n)], dtype=torch.float64), mean, var * n]))
    count, mean, var = combine_moments(torch.stack(rows))
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert count.item() == 28
    assert torch.allclose(mean, ref_mean) and torch.allclose(var, ref_var)


def test_sync_bn_without_process_group_is_bn_mish():
    torch.manual_seed(0)
    x, residual = torch.randn(4, 5, 3, 3), torch.randn(4, 5, 3, 3)
    plain, sync = BatchNormMish2d(5), SyncBatchNormMish2d(5)
    sync.load_state_dict(plain.state_dict())
    for mode in (True, False):
        plain.train(mode)
        sync.train(mode)
        assert torch.equal(sync(x, residual), plain(x, residual))
    assert torch.equal(sync.running_var, plain.running_var)


def test_convert_sync_batchnorm_keeps_state_dict_and_backend():
    model = get_model("cspmirrornet_tiny", num_classes=3)
    model.stem.bn.backend = "reference"
    model.stem.bn.num_batches_tracked.fill_(7)
    model.eval()
    n_bn = sum(isinstance(m, BatchNormMish2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stem_weight = model.stem.bn.weight
    converted = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNormMish2d) for m in converted.modules()) == n_bn
    after = converted.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert converted.stem.bn.weight is stem_weight and converted.stem.bn.backend == "reference"
    assert not any(m.training for m in converted.modules())


# ----------------------------------------------------------------------------------------- DDP training


def test_ddp_training_matches_one_process_on_the_whole_batch(ddp_results, tmp_path):
    """2 processes x 8 images with SyncBN == 1 process x 16 images: weights, BN buffers, metrics."""
    from cspmirror.cli import main

    assert "WORLD_SIZE" not in os.environ
    assert main([*TRAIN_ARGS, "--output", str(tmp_path / "single")]) == 0
    ddp = torch.load(ddp_results / "ddp" / "last.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    assert ddp["epoch"] == single["epoch"] == 1
    assert ddp["scheduler"]["last_epoch"] == single["scheduler"]["last_epoch"] == 3
    assert list(ddp["model"]) == list(single["model"])  # no "module." prefix, same keys as BatchNormMish2d
    for key, value in single["model"].items():
        if value.is_floating_point():
            _close(ddp["model"][key], value, key, rtol=1e-4, atol=2e-5)
        else:
            assert torch.equal(ddp["model"][key], value), key
    torch.manual_seed(7)  # the run's initial weights: training moved them well beyond the tolerance
    init = get_model("cspmirrornet_tiny", num_classes=3).state_dict()
    assert (single["model"]["stem.conv.weight"] - init["stem.conv.weight"]).abs().max() > 1e-3
    rows_ddp = read_csv(ddp_results / "ddp" / "metrics.csv")
    rows_single = read_csv(tmp_path / "single" / "metrics.csv")
    for key in ("train_loss", "val_loss"):
        assert rows_ddp[0][key] == pytest.approx(rows_single[0][key], rel=1e-4), key
    for key in ("train_acc", "val_acc"):
        assert rows_ddp[0][key] == pytest.approx(rows_single[0][key], abs=5.01), key  # at most one flip


def test_ddp_without_sync_bn_validates_the_saved_model(ddp_results):
    """With --no-sync-bn each process has its own BatchNorm running statistics; validation uses rank 0's (the
    saved ones) on every process, so the logged validation metrics are those of the checkpoint."""
    from cspmirror.train.checkpointing import load_checkpoint_dict, model_from_checkpoint
    from cspmirror.train.data import DataConfig, build_datasets, stats_tensors
    from cspmirror.train.distributed import DistContext
    from cspmirror.train.engine import StepEnv, evaluate, make_loader

    run = ddp_results / "ddp_no_sync_bn"
    state = load_checkpoint_dict(run)
    data = build_datasets(DataConfig(format="synthetic", image_size=16, synthetic_train=48, synthetic_val=20,
                                     synthetic_classes=3, workers=0))
    cpu = torch.device("cpu")
    env = StepEnv(cpu, *stats_tensors(data.mean, data.std, cpu), progress=False)
    loader = make_loader(data.val, 8, DistContext(), train=False, seed=0, workers=0, device=cpu)
    metrics = evaluate(model_from_checkpoint(state), loader, env)
    (row,) = read_csv(run / "metrics.csv")
    assert metrics["loss"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert metrics["top1"] == pytest.approx(row["val_acc"]) and metrics["top5"] == pytest.approx(row["val_top5"])


def test_ddp_ablation_trains_every_point_in_one_group(ddp_results):
    """Both points trained (rank 0 wrote their runs and the table) although rank 0 was slow to leave."""
    rows = read_csv(ddp_results / "ablate" / "ablation.csv")
    assert [r["label"] for r in rows] == ["overlap=0.0", "overlap=0.25"]
    for run in sorted((ddp_results / "ablate" / "runs").iterdir()):
        assert len(read_csv(run / "metrics.csv")) == 1, run
