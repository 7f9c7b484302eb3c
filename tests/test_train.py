"""cspmirror train / eval / ablate end to end on tiny data (CIFAR-10 pickle format written here, synthetic),
plus the pure parts: recipes, schedules, grids, data readers."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cspmirror
from cspmirror import backends
from cspmirror.cli import main
from cspmirror.train import ablation, recipes
from cspmirror.train.data import CIFAR10Batches, SyntheticPatterns
from cspmirror.train.history import read_csv

N_TRAIN, N_TEST, CLASSES = 64, 32, 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One epoch of cspmirrornet_tiny on the tiny CIFAR folder: 4 steps of 16.
TINY = ["--model", "cspmirrornet_tiny", "--batch-size", "16", "--workers", "0", "--seed", "3", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads waste a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """One pickled batch as CIFAR-10 ships it: uint8 rows [n, 3072] (R plane, G plane, B plane)."""
    entry = {"batch_label": path.name, "labels": labels, "data": images.reshape(len(labels), -1),
             "filenames": [f"{i}.png" for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """64 training images over data_batch_1..5 and 32 test images, 32x32, labels cycling over 0..9."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (N_TRAIN, 3, 32, 32), dtype=np.uint8)
    labels = [i % CLASSES for i in range(N_TRAIN)]
    for b, chunk in enumerate(np.array_split(np.arange(N_TRAIN), 5), start=1):
        _write_batch(folder / f"data_batch_{b}", train[chunk], [labels[i] for i in chunk])
    test = rng.integers(0, 256, (N_TEST, 3, 32, 32), dtype=np.uint8)
    _write_batch(folder / "test_batch", test, [i % CLASSES for i in range(N_TEST)])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(CLASSES)], "num_vis": 3072}, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def one_epoch(cifar_root, tmp_path_factory) -> Path:
    """The run folder of one epoch through the CLI (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("run") / "one"
    assert main(["train", "--data", str(cifar_root), "--epochs", "1", "--output", str(out), *TINY]) == 0
    return out


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ end to end


def test_cifar_reader_matches_the_pickles(cifar_root):
    ds = CIFAR10Batches(cifar_root, train=True)
    assert len(ds) == N_TRAIN and ds.classes[3] == "c3"
    with open(cifar_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="latin1")
    image, label = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert torch.equal(image.flatten(), torch.from_numpy(first["data"][0])) and label == first["labels"][0]


def test_one_epoch_writes_checkpoint_metrics_and_plot(one_epoch):
    rows = read_csv(one_epoch / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1]
    assert set(rows[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "time"}
    assert np.isfinite([rows[0]["train_loss"], rows[0]["val_loss"]]).all()
    assert rows[0]["lr"] == pytest.approx(0.1)  # the paper recipe
    png = (one_epoch / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    state = _state(one_epoch / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "args", "recipe"} <= set(state)
    assert state["epoch"] == 1 and state["model_name"] == "cspmirrornet_tiny"
    assert state["scheduler"]["last_epoch"] == N_TRAIN // 16  # one scheduler step per optimizer step
    assert state["recipe"] == recipes.RECIPES["paper"].with_overrides(epochs=1, batch_size=16).to_dict()
    assert "momentum_buffer" in next(iter(state["optimizer"]["state"].values()))


def test_resume_without_output_goes_on_in_the_run_folder(tmp_path):
    """``--resume RUN`` (a folder or its checkpoint file) without ``--output`` writes into RUN."""
    from cspmirror.cli import build_parser
    from cspmirror.commands.train import DEFAULT_OUTPUT, config_from_args

    run = tmp_path / "run"
    run.mkdir()
    for resume in (run, run / "last.pt"):
        cfg = config_from_args(build_parser().parse_args(["train", "--resume", str(resume)]))
        assert cfg.output == str(run) and cfg.resume == str(resume)
    assert config_from_args(build_parser().parse_args(["train"])).output == DEFAULT_OUTPUT
    cfg = config_from_args(build_parser().parse_args(["train", "--resume", "--output", str(run)]))
    assert cfg.output == cfg.resume == str(run)


def test_resume_continues_exactly(one_epoch, cifar_root, tmp_path):
    """1 epoch + resume for a 2nd == 2 epochs straight (same seed): weights, buffers and metrics."""
    resumed = tmp_path / "resumed"
    shutil.copytree(one_epoch, resumed)
    args = ["--data", str(cifar_root), "--epochs", "2", *TINY]
    assert main(["train", "--resume", "--output", str(resumed), *args]) == 0
    straight = tmp_path / "straight"
    assert main(["train", "--output", str(straight), *args]) == 0

    a, b = _state(resumed / "last.pt"), _state(straight / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    rows_a, rows_b = read_csv(resumed / "metrics.csv"), read_csv(straight / "metrics.csv")
    assert [r["epoch"] for r in rows_a] == [1, 2]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-9)
        assert ra["val_acc"] == rb["val_acc"]
    # resuming actually trained: the weights moved away from the epoch-1 checkpoint
    first = _state(one_epoch / "last.pt")["model"]
    assert not torch.equal(first["fc.weight"], a["model"]["fc.weight"])


def test_eval_prints_top1_top5_and_matches_training(one_epoch, cifar_root, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(one_epoch / "last.pt"), "--data", str(cifar_root),
                 "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"on (\d+) val images: top-1 ([\d.]+)%\s+top-5 ([\d.]+)%\s+loss ([\d.]+)", out)
    assert match, out
    count, top1, top5, loss = int(match[1]), *map(float, match.groups()[1:])
    assert count == N_TEST and 0 <= top1 <= top5 <= 100
    row = read_csv(one_epoch / "metrics.csv")[-1]
    assert top1 == pytest.approx(row["val_acc"], abs=0.01) and top5 == pytest.approx(row["val_top5"], abs=0.01)
    assert loss == pytest.approx(row["val_loss"], rel=1e-3)


def test_synthetic_task_is_learned(tmp_path):
    """4 classes (chance 25%): the training loss falls and validation accuracy clearly beats chance."""
    out = tmp_path / "syn"
    assert main(["train", "--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "192",
                 "--synthetic-val", "64", "--batch-size", "32", "--epochs", "3", "--lr", "0.05", "--workers", "0",
                 "--seed", "0", "--no-progress", "--output", str(out)]) == 0
    rows = read_csv(out / "metrics.csv")
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    assert rows[-1]["train_acc"] > 80
    assert max(r["val_acc"] for r in rows) > 50


@pytest.mark.parametrize("fmt, expected", [
    ("cifar10", ["cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta"]),
    ("imagefolder", ["train/<class>", "val/<class>"]),
    ("auto", ["--data-format auto", "cifar-10-batches-py", "data_batch_1", "train/<class>", "val/<class>"]),
])
def test_missing_data_gives_a_clear_message(fmt, expected, tmp_path, capsys):
    missing = tmp_path / "no_data_here"
    code = main(["train", "--data", str(missing), "--data-format", fmt, "--output", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert code != 0
    assert str(missing) in err and "never downloads" in err
    assert all(word in err for word in expected), err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "last.pt").exists()


def test_missing_data_folder_argument(capsys, tmp_path):
    assert main(["train", "--output", str(tmp_path), *TINY]) == 2
    assert "--data" in capsys.readouterr().err


def test_bad_recipe_value_names_the_flag(capsys, tmp_path):
    code = main(["train", "--data-format", "synthetic", "--lr", "-1", "--output", str(tmp_path), *TINY])
    assert code == 2 and "--lr" in capsys.readouterr().err


def test_drop_path_and_grad_checkpointing_flags(tmp_path, monkeypatch):
    """``--drop-path-rate`` reaches the model's dense blocks and ``--grad-checkpointing`` its stages; a step
    runs with both; a rate out of range names its flag."""
    from cspmirror.train import engine

    built = []
    get_model = engine.get_model
    monkeypatch.setattr(engine, "get_model", lambda *a, **k: built.append(get_model(*a, **k)) or built[-1])
    args = ["train", "--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "32",
            "--synthetic-val", "16", "--epochs", "1", "--output", str(tmp_path / "run"), *TINY]
    assert main([*args, "--drop-path-rate", "0.2", "--grad-checkpointing"]) == 0
    (model,) = built
    assert model.grad_checkpointing and model.stages[-1].branches[0].blocks[-1].drop_path == 0.2


def test_bad_drop_path_rate_names_the_flag(capsys, tmp_path):
    code = main(["train", "--data-format", "synthetic", "--drop-path-rate", "1", "--output", str(tmp_path), *TINY])
    assert code == 2 and "--drop-path-rate" in capsys.readouterr().err


def test_imagefolder_and_modern_recipe(tmp_path):
    """An ImageFolder tree of PNGs, with the modern recipe (augmentation, cosine + warm-up, bf16 AMP)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--data-format", "imagefolder", "--image-size", "16",
                 "--recipe", "modern", "--epochs", "2", "--warmup-epochs", "1", "--batch-size", "4", "--workers",
                 "0", "--no-progress", "--output", str(out)]) == 0
    state = _state(out / "last.pt")
    assert state["classes"] == ["cat", "dog"] and state["recipe"]["amp"] and state["recipe"]["augment"]
    rows = read_csv(out / "metrics.csv")
    # warm-up: the first epoch starts at 1/(1 epoch * 2 steps) of the peak lr, the second at the peak
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.1])
    assert all(np.isfinite(r["train_loss"]) for r in rows)


def test_ablate_synthetic_grid_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--synthetic", "--grid", "overlap=0,0.25", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--image-size", "16", "--synthetic-train", "64",
                 "--synthetic-val", "32", "--batch-size", "16", "--workers", "0", "--no-progress",
                 "--output", str(out)]) == 0
    rows = read_csv(out / "ablation.csv")
    assert [r["label"] for r in rows] == ["overlap=0.0", "overlap=0.25"]
    assert all(0 <= r["val_acc"] <= 100 and r["params_m"] > 0 for r in rows)
    table = (out / "ablation.md").read_text()
    assert "| label |" in table and "overlap=0.25" in table
    assert (out / "ablation.png").read_bytes().startswith(PNG_MAGIC)
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    assert _state(out / "runs" / runs[0] / "last.pt")["model_kwargs"] == {"overlap": 0.0}


# Synthetic 16x16 data: cspmirrornet_tiny's last stage is then 1x1, like cspmirrornet_s on CIFAR-10.
SYN = ["--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "32", "--synthetic-val", "16",
       "--epochs", "1", *TINY]


def _triton_unavailable(monkeypatch):
    from cspmirror import backends

    monkeypatch.setattr(backends, "triton_status",
                        lambda device=None: backends.BackendStatus("triton", False, "not in this test"))


def _imagefolder(root: Path, classes: dict[str, tuple[str, ...]]) -> Path:
    from PIL import Image

    for split, names in classes.items():
        for cls in names:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["image_size", "device", "device_name", "device_meta", "device_index",
                                  "synthetic_train", "seed", "lr",
                                  "limit_val_batches", "backend", "extension_build", "resume_classes",
                                  "resume_not_a_checkpoint", "resume_text_file", "resume_optimizer",
                                  "resume_model", "resume_knob", "resume_recipe", "resume_finished",
                                  "imagefolder_classes", "imagefolder_empty_class", "output", "warmup",
                                  "data_both_layouts", "cifar_truncated", "cifar_not_a_batch", "cifar_labels",
                                  "cifar_pixels", "cifar_label_count",
                                  "resume_class_names", "resume_weights", "resume_model_only", "batch_of_one",
                                  "no_training_step", "seed_too_large", "synthetic_classes",
                                  "synthetic_with_data", "lr_float32"])
def test_configuration_errors_are_one_line(case, one_epoch, cifar_root, tmp_path, capsys, monkeypatch):
    """What a wrong flag, data folder or checkpoint raises is an error line (exit 2), before training starts."""
    out = tmp_path / "run"
    syn = ["--data-format", "synthetic", *TINY]
    cifar = ["--data", str(cifar_root), *TINY]
    if case.startswith(("cifar_", "resume_class_names")):  # were tracebacks (the labels: at the first step)
        data = tmp_path / "data"
        shutil.copytree(cifar_root, data)
        batch = data / "cifar-10-batches-py" / "data_batch_2"
        entry = pickle.loads(batch.read_bytes(), encoding="latin1")
        if case == "cifar_truncated":
            batch.write_bytes(batch.read_bytes()[:100])
            expected = f"{batch}: cannot be read as a CIFAR-10 python file (UnpicklingError"
        elif case == "cifar_not_a_batch":
            batch.write_bytes(pickle.dumps([1, 2]))
            expected = f"{batch}: not a CIFAR-10 python file (a pickled dict with ['data', 'labels|fine_labels']"
        elif case == "cifar_labels":
            _write_batch(batch, entry["data"], [CLASSES] * len(entry["labels"]))
            expected = f"{batch}: labels [10] are not in [0, 10)"
        elif case == "cifar_pixels":  # 16-bit values: uint8 would wrap them
            _write_batch(batch, entry["data"].astype(np.int16) + 1, entry["labels"])
            expected = f"{batch}: 'data' must hold 8-bit values (0..255)"
        elif case == "cifar_label_count":
            batch.write_bytes(pickle.dumps({**entry, "labels": entry["labels"][:-1]}))
            expected = f"{batch}: {len(entry['labels'])} images but {len(entry['labels']) - 1} labels"
        else:  # the same number of classes, other names: the labels would mean other classes
            meta = data / "cifar-10-batches-py" / "batches.meta"
            meta.write_bytes(pickle.dumps({"label_names": [f"d{i}" for i in range(CLASSES)]}))
            args, expected = ["--resume", str(one_epoch), "--epochs", "2"], "are not the checkpoint's"
        args = [*(args if case == "resume_class_names" else ["--epochs", "1"]), "--data", str(data), *TINY]
    elif case in ("resume_weights", "resume_model_only"):  # were a RuntimeError and a KeyError
        state = _state(one_epoch / "last.pt")
        if case == "resume_weights":  # as if written by a version with other module names
            state["model"] = {k.replace("stem.", "stem0."): v for k, v in state["model"].items()}
            expected = "the checkpoint's weights do not fit its model, cspmirrornet_tiny"
        else:
            state = {k: state[k] for k in ("model", "model_name", "num_classes", "mean", "std")}
            expected = "is not a cspmirror training checkpoint (missing ['model_kwargs', 'optimizer'"
        torch.save(state, tmp_path / "edited.pt")
        args = ["--resume", str(tmp_path / "edited.pt"), *cifar, "--epochs", "2"]
    elif case == "batch_of_one":  # was a traceback from BatchNorm at the first step: the last stage is 1x1 at 16
        args = [*SYN, "--batch-size", "1"]
        expected = "batch_size (--batch-size) gives one image per process: BatchNorm cannot train on one value"
    elif case == "no_training_step":  # one image, whose batch of one is dropped: was "steps_per_epoch must be"
        args, expected = [*SYN, "--synthetic-train", "1"], "the training split has 1 image(s): no training step"
    elif case == "seed_too_large":  # was a traceback at the second epoch (seed + epoch seeds a torch.Generator)
        args, expected = [*syn, "--seed", str(2**64 - 1)], "seed (--seed) must be >= 0 and < 2**63"
    elif case == "synthetic_classes":
        args, expected = [*syn, "--synthetic-classes", "9"], "synthetic_classes (--synthetic-classes) must be in"
    elif case == "synthetic_with_data":  # was: trained on the synthetic data, the folder silently ignored
        args, expected = [*SYN, "--data", str(cifar_root)], "--data-format synthetic generates its data"
    elif case == "device_name":
        args, expected = ["--device", "foo", *syn], "argument --device: expected auto, cpu, cuda or cuda:N, got 'foo'"
    elif case == "device_meta":  # was a traceback from autocast
        args, expected = ["--device", "meta", *syn], "argument --device: expected auto, cpu, cuda or cuda:N"
    elif case == "device_index":  # was taken, then failed where the model moved there
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        args, expected = ["--device", "cuda:1", *syn], "'cuda:1' asked for CUDA device 1, but this machine has 1"
    elif case == "seed":
        args, expected = [*syn, "--seed", "-1"], "seed (--seed) must be >= 0"
    elif case == "lr":  # inf passed every range check, then trained on NaN
        args, expected = ["--lr", "inf", *syn], "recipe field lr (--lr) must be finite"
    elif case == "lr_float32":  # was a traceback at the first step: the float32 parameters cannot take it
        args, expected = ["--lr", "1e39", *syn], "recipe field lr (--lr) must be finite, within float32's range"
    elif case == "limit_val_batches":
        args, expected = ["--limit-val-batches", "0", *syn], "(--limit-val-batches) must be >= 1"
    elif case == "extension_build":  # listed as available before its first build, which fails
        def failing(backend: str) -> None:
            raise backends.BackendUnavailableError("the extension could not be loaded: c++: error: bad flag")

        monkeypatch.setattr(backends, "ensure_loaded", failing)
        args, expected = ["--backend", "extension", *syn], "c++: error: bad flag"
    elif case == "resume_text_file":
        (tmp_path / "notes.txt").write_text("not a checkpoint\n")
        args, expected = ["--resume", str(tmp_path / "notes.txt"), *syn], "is not a cspmirror training checkpoint"
    elif case == "resume_optimizer":  # the saved optimizer state is SGD's: was a KeyError at the first step
        args = ["--resume", str(one_epoch), *cifar, "--epochs", "2", "--optimizer", "adamw"]
        expected = "(--optimizer) cannot change"
    elif case in ("resume_model", "resume_knob", "resume_recipe", "resume_finished"):  # were silently ignored
        args, expected = {
            "resume_model": (["--model", "cspmirrornet_s"], "--model cspmirrornet_s: the checkpoint resumed is a"),
            "resume_knob": (["--overlap", "0.5"], "--overlap: the checkpoint resumed was trained with"),
            "resume_recipe": (["--recipe", "modern"], "--recipe modern: the checkpoint's recipe differs in"),
            "resume_finished": (["--epochs", "1"], "the checkpoint resumed has done 1 epochs already"),
        }[case]
        args = ["--resume", str(one_epoch), *cifar, "--epochs", "2", *args]
    elif case == "imagefolder_empty_class":  # the message names the split's folder
        root = _imagefolder(tmp_path / "data", {"train": ("cat", "dog"), "val": ("cat",)})
        (root / "val" / "dog").mkdir()
        args = ["--data", str(root), "--data-format", "imagefolder", "--image-size", "8", *TINY]
        expected = f"{root / 'val'}: Found no valid file for the classes dog"
    elif case == "warmup":  # was: two epochs inside the warm-up, the learning rate never at its peak
        args = [*syn, "--recipe", "modern", "--epochs", "2", "--warmup-epochs", "2", "--max-steps-per-epoch", "1"]
        expected = "recipe field warmup_epochs (--warmup-epochs) must be < epochs (--epochs), got 2 for 2 epochs"
    elif case == "data_both_layouts":  # --data-format auto cannot choose
        root = _imagefolder(tmp_path / "data", {"train": ("cat",), "val": ("cat",)})
        shutil.copytree(cifar_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
        args = ["--data", str(root), "--epochs", "1", *TINY]
        expected = "holds both CIFAR-10's batches and an ImageFolder tree"
    elif case == "output":  # an output folder that cannot be created fails before the data is read
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "run"
        args, expected = syn, "--output"
    elif case == "image_size":
        args, expected = ["--data", str(cifar_root), "--image-size", "64", *TINY], "--image-size"
    elif case == "device":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args, expected = ["--device", "cuda", *syn], "argument --device: 'cuda' asked for CUDA, but no CUDA device"
    elif case == "synthetic_train":
        args, expected = ["--synthetic-train", "0", *syn], "synthetic_train (--synthetic-train) must be >= 1"
    elif case == "backend":
        _triton_unavailable(monkeypatch)
        args, expected = ["--backend", "triton", *syn], "backend='triton' cannot run here"
    elif case == "resume_classes":  # the checkpoint has 10 classes, the synthetic data 4
        args = ["--resume", str(one_epoch), *syn, "--epochs", "2"]
        expected = "the data has 4 classes but the checkpoint's model has 10"
    elif case == "resume_not_a_checkpoint":
        torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
        args, expected = ["--resume", str(tmp_path / "other.pt"), *syn], "is not a cspmirror training checkpoint"
    else:
        root = _imagefolder(tmp_path / "data", {"train": ("cat", "dog"), "val": ("cat",)})
        args = ["--data", str(root), "--data-format", "imagefolder", "--image-size", "8", *TINY]
        expected = "different class folders"
    assert main(["train", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err  # (torch may warn first, e.g. on loading its C++ extension tools)
    assert any(line.startswith("cspmirror train: error: ") for line in err.splitlines()) and expected in err, err
    assert "Traceback" not in err and not out.exists()


def test_configuration_errors_name_the_rank_under_torchrun(monkeypatch, capsys):
    """Every process that meets the error prints it (one rank alone may): the lines say which."""
    from cspmirror.train import cli_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli_args.fail("train", ValueError("bad flag")) == 2
    assert capsys.readouterr().err == "cspmirror train: error (rank 1 of 2): bad flag\n"


def test_ablate_configuration_error_is_one_line(tmp_path, capsys, monkeypatch):
    _triton_unavailable(monkeypatch)
    assert main(["ablate", "--synthetic", "--backend", "triton", "--grid", "overlap=0", *TINY,
                 "--output", str(tmp_path / "abl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cspmirror ablate: error: backend='triton' cannot run here"), err
    assert not (tmp_path / "abl").exists()


def test_an_ablation_cut_short_keeps_the_table_of_its_finished_points(tmp_path, monkeypatch):
    """The report is written after every point: an error (or Ctrl-C) in the second point left no table at all
    for the first."""
    from cspmirror.train import engine

    prepare, calls = engine.prepare, []

    def second_fails(cfg):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prepare(cfg)

    monkeypatch.setattr(ablation, "prepare", second_fails)
    out = tmp_path / "abl"
    with pytest.raises(KeyboardInterrupt):
        main(["ablate", "--synthetic", "--grid", "overlap=0,0.5", *SYN, "--max-steps-per-epoch", "1",
              "--output", str(out)])
    assert [r["label"] for r in read_csv(out / "ablation.csv")] == ["overlap=0.0"]
    assert "1 of 2 points finished so far" in (out / "ablation.md").read_text()


def test_ablate_resume_goes_on_where_it_was_cut_short(tmp_path, monkeypatch, capsys):
    """--resume: the finished point is read from its run (not trained again), the one cut short in its second
    epoch goes on from its last.pt, the one not started trains; the table is the uninterrupted ablation's."""
    from cspmirror.train import engine

    grid = ["ablate", "--synthetic", "--grid", "overlap=0,0.25,0.5", *SYN, "--epochs", "2",
            "--max-steps-per-epoch", "1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*grid, "--output", str(full)]) == 0
    train_one_epoch, epochs, interrupted = engine.train_one_epoch, [], []

    def counted(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 4 and not interrupted:  # the second point's second epoch (once: a later run that trains by
            interrupted.append(1)  # mistake fails its test, not the whole pytest session as a KeyboardInterrupt)
            raise KeyboardInterrupt
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", counted)
    with pytest.raises(KeyboardInterrupt):
        main([*grid, "--output", str(cut)])
    epochs.clear()
    capsys.readouterr()
    assert main([*grid, "--output", str(cut), "--resume"]) == 0
    assert len(epochs) == 3 and capsys.readouterr().out.count("(finished: read from its run)") == 1
    compared = ("label", "params_m", "val_acc", "val_loss", "train_acc", "train_loss")
    rows = [[r[k] for k in compared] for r in read_csv(cut / "ablation.csv")]
    assert rows == [[r[k] for k in compared] for r in read_csv(full / "ablation.csv")] and len(rows) == 3
    assert "points finished so far" not in (cut / "ablation.md").read_text()

    assert main([*grid, "--output", str(cut), "--resume", "--no-mirror"]) == 2  # finished points checked too
    assert "'mirror': False, 'overlap': 0.0} now); go on with the grid and flags" in capsys.readouterr().err
    assert main([*grid, "--output", str(cut), "--resume", "--lr", "0.05"]) == 2  # the points would not compare
    assert "trained otherwise than the grid and flags give (recipe field lr (--lr) " in capsys.readouterr().err
    assert main([*grid, "--output", str(tmp_path / "typo"), "--resume"]) == 2
    assert "holds no ablation to go on with" in capsys.readouterr().err


def test_an_ablation_row_has_its_best_epoch_and_its_whole_time(tmp_path, monkeypatch):
    """val_acc is the last epoch's, best_val_acc the best epoch's, time_s every epoch's (not the last's)."""
    _fixed_val_acc(monkeypatch, 50.0, 40.0)
    out = tmp_path / "abl"
    assert main(["ablate", "--synthetic", "--grid", "overlap=0", *SYN, "--epochs", "2", "--max-steps-per-epoch", "1",
                 "--output", str(out)]) == 0
    (row,) = read_csv(out / "ablation.csv")
    (run,) = (out / "runs").iterdir()
    assert row["val_acc"] == 40.0 and row["best_val_acc"] == 50.0
    assert row["time_s"] == pytest.approx(sum(r["time"] for r in read_csv(run / "metrics.csv")))


def test_an_error_inside_training_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the set-up is checked for configuration errors: a ValueError from the training step (a bug) is
    raised, not turned into an error line."""
    from cspmirror.train import engine

    def broken(*args, **kwargs):
        raise ValueError("a bug in a kernel")

    monkeypatch.setattr(engine, "train_one_epoch", broken)
    with pytest.raises(ValueError, match="a bug in a kernel"):
        main(["train", *SYN, "--output", str(tmp_path / "run")])


@pytest.mark.parametrize(("size", "last"), [(16, 1), (17, 2), (24, 2), (33, 3)])
def test_batch_of_one_is_refused_only_where_the_last_stage_is_1x1(size, last):
    """A 3x3 conv of stride 2 and padding 1 takes a side s to ceil(s / 2): cspmirrornet_tiny's 4 stages take 16 to
    1x1 (a batch of one refused) but 17 or 24 to 2x2 and 33 to 3x3 (a batch of one trains)."""
    from cspmirror.train.engine import _check_batch_norm_trains

    model = cspmirror.get_model("cspmirrornet_tiny", num_classes=2).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, size, size)).shape[-1] == last
    if last == 1:
        with pytest.raises(recipes.RecipeError, match="--batch-size"):
            _check_batch_norm_trains("cspmirrornet_tiny", size, 1, False)
    else:
        _check_batch_norm_trains("cspmirrornet_tiny", size, 1, False)


def test_a_last_training_batch_of_one_is_dropped(tmp_path):
    """17 images in batches of 8: 8, 8 and 1; BatchNorm cannot train on the single image at the 1x1 last
    stage, so the epoch takes 2 steps (18 images: 3 steps, the last batch of 2 is kept)."""
    out = tmp_path / "run"
    assert main(["train", *SYN, "--synthetic-train", "17", "--batch-size", "8", "--output", str(out)]) == 0
    assert _state(out / "last.pt")["scheduler"]["last_epoch"] == 2


@pytest.mark.parametrize(("length", "world", "batch", "batches"), [
    (17, 1, 8, 2), (18, 1, 8, 3), (16, 1, 8, 2), (5, 1, 1, 5),
    (34, 2, 8, 2), (33, 2, 8, 2), (30, 2, 8, 2), (36, 2, 8, 3),
])
def test_train_loader_drops_only_a_last_batch_of_one(length, world, batch, batches):
    from cspmirror.train.distributed import DistContext
    from cspmirror.train.engine import make_loader

    for rank in range(world):
        ctx = DistContext(rank, world)
        loader = make_loader(list(range(length)), batch, ctx, train=True, seed=0, workers=0,
                             device=torch.device("cpu"))
        assert len(loader) == len(list(loader)) == batches
        val = make_loader(list(range(length)), batch, ctx, train=False, seed=0, workers=0,
                          device=torch.device("cpu"))
        assert sum(len(b) for b in val) == len(range(rank, length, world))  # evaluation sees every sample


def test_without_matplotlib_no_png_and_one_note(tmp_path, capsys, monkeypatch):
    """matplotlib is an optional extra: train and ablate skip their PNGs and say so once."""
    import sys

    from cspmirror.train import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(plots, "_noted", False)
    out = tmp_path / "abl"
    assert main(["ablate", "--synthetic", "--grid", "overlap=0", *SYN, "--max-steps-per-epoch", "1",
                 "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("matplotlib is not installed") == 1 and "cspmirror[plot]" in stdout
    assert (out / "ablation.csv").exists() and not (out / "ablation.png").exists()
    (run,) = (out / "runs").iterdir()
    assert (run / "last.pt").exists() and (run / "metrics.csv").exists() and not (run / "curves.png").exists()


def test_ablate_split_stages_flag(tmp_path):
    """--split-stages applies to every grid point (it was resolved twice and always refused)."""
    out = tmp_path / "abl"
    assert main(["ablate", "--synthetic", "--split-stages", "0,1", "--grid", "overlap=0,0.5", *SYN,
                 "--max-steps-per-epoch", "1", "--output", str(out)]) == 0
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert _state(run / "last.pt")["model_kwargs"]["split_stages"] == [True, True, False, False]


def test_split_stages_all_label_and_knobs():
    assert ablation.point_label({"split_stages": None}) == "split_stages=all"
    assert ablation.point_label({"split_stages": []}) == "split_stages=none"
    assert ablation.point_label({"split_stages": [0, 2]}) == "split_stages=0+2"
    base = {"split_stages": [True, True, False, False], "overlap": 0.5}
    assert ablation.point_knobs("cspmirrornet_tiny", base, {"split_stages": None}) == {"overlap": 0.5}
    assert ablation.point_knobs("cspmirrornet_tiny", base, {"split_stages": [3]}) == {
        "split_stages": [False, False, False, True], "overlap": 0.5}
    assert ablation.point_knobs("cspmirrornet_tiny", base, {"mirror": False}) == {**base, "mirror": False}


@pytest.mark.parametrize(("grid", "knob"), [
    ("overlap=0,0.5,2", "overlap"), ("axis=0", "axis"), ("split_stages=9", "split_stages"),
    ("split_stages=x", "split_stages"), ("reduce=max", "reduce"),
    ("overlap=0,0.5;overlap=0.25", "knob 'overlap' is given twice"),  # was: 0.25 trained twice, 0 and 0.5 never
    ("", "--grid '' names no knob"),  # was: the whole default preset
    ("overlap=0 --data /some/where", "--synthetic generates its data"),
])
def test_bad_grid_value_fails_before_training(grid, knob, tmp_path, capsys):
    out = tmp_path / "abl"
    grid, *extra = grid.split(" ")
    assert main(["ablate", "--synthetic", "--grid", grid, *extra, *TINY, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cspmirror ablate: error: ") and knob in err and "Traceback" not in err, err
    assert not out.exists()  # nothing trained


def test_eval_argument_errors(one_epoch, cifar_root, tmp_path, capsys, monkeypatch):
    base = ["eval", "--checkpoint", str(one_epoch), "--data", str(cifar_root), "--workers", "0", "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--limit-batches", "0"])
    assert exc.value.code == 2 and "--limit-batches" in capsys.readouterr().err
    assert main([*base, "--json", str(tmp_path)]) == 2  # was a traceback after the whole evaluation
    assert "is a folder" in capsys.readouterr().err
    _triton_unavailable(monkeypatch)
    assert main([*base, "--backend", "triton"]) == 2
    assert capsys.readouterr().err.startswith("cspmirror eval: error: backend='triton' cannot run here")
    assert main([*base, "--device", "meta"]) == 2  # was a traceback
    assert "cspmirror eval: error: argument --device: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_eval_json_creates_its_folder(one_epoch, cifar_root, tmp_path):
    path = tmp_path / "new" / "folder" / "metrics.json"
    assert main(["eval", "--checkpoint", str(one_epoch), "--data", str(cifar_root), "--workers", "0",
                 "--no-progress", "--batch-size", "16", "--limit-batches", "1", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["count"] == 16


def test_resume_without_seed_continues_with_the_checkpoints(tmp_path):
    """--seed is the checkpoint's when not given again: before, it fell back to 0 and the resumed epochs saw
    other shuffles and augmentations."""
    straight, part = tmp_path / "straight", tmp_path / "part"
    flags = ["--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "32", "--synthetic-val", "16",
             "--batch-size", "16", "--workers", "0", "--no-progress"]
    assert main(["train", *flags, "--seed", "5", "--epochs", "2", "--output", str(straight)]) == 0
    assert main(["train", *flags, "--seed", "5", "--epochs", "1", "--output", str(part)]) == 0
    assert main(["train", *flags, "--epochs", "2", "--resume", str(part)]) == 0
    a, b = (torch.load(run / "last.pt", weights_only=True)["model"] for run in (straight, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "config.json").read_text())["args"]["seed"] == 5


def test_resuming_an_earlier_checkpoint_keeps_the_later_epochs(one_epoch, cifar_root, tmp_path, capsys):
    """--resume RUN/best.pt goes on in RUN by default: it overwrote RUN's later epochs (last.pt, metrics.csv)
    without a word; another --output is fine."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    later = _state(run / "last.pt")
    later["epoch"] = 2  # as if the run had gone on past its best epoch
    torch.save(later, run / "last.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = ["train", "--resume", str(run / "best.pt"), "--data", str(cifar_root), "--epochs", "3", *TINY]
    assert main(args) == 2
    assert "holds a run at epoch 2, past the checkpoint resumed (epoch 1)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert main([*args, "--output", str(tmp_path / "other")]) == 0
    same = tmp_path / "same"  # best.pt at last.pt's epoch: no later epoch to lose, it goes on in its folder
    shutil.copytree(one_epoch, same)
    assert main([*args[:2], str(same / "best.pt"), *args[3:]]) == 0 and _state(same / "last.pt")["epoch"] == 3


def test_eval_amp_evaluates_under_autocast(one_epoch, cifar_root, monkeypatch):
    from cspmirror.commands import eval as eval_command

    evaluate, seen = eval_command.evaluate, []

    def spy(model, loader, env, *args, **kwargs):
        seen.append(env.amp_dtype)
        return evaluate(model, loader, env, *args, **kwargs)

    monkeypatch.setattr(eval_command, "evaluate", spy)
    flags = ["eval", "--checkpoint", str(one_epoch), "--data", str(cifar_root), "--workers", "0",
             "--limit-batches", "1"]
    assert main([*flags, "--amp"]) == 0 and main(flags) == 0
    assert seen == [torch.bfloat16, None]  # (on the CPU)


def test_model_from_checkpoint_is_the_runs_model_in_eval_mode(one_epoch):
    """As its docstring says (callers other than ``evaluate``, which sets the mode itself, get a model to run)."""
    from cspmirror.train.checkpointing import model_from_checkpoint

    state = _state(one_epoch / "last.pt")
    model = model_from_checkpoint(state)
    assert not model.training and all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_resume_keeps_the_image_size(tmp_path):
    """An ImageFolder run at --image-size 8 resumed without the flag goes on at 8, as eval reads it: it went on
    at 224, the format's default, silently (and the checkpoint said 224 from then on)."""
    root = _imagefolder(tmp_path / "data", {"train": ("ant", "bee"), "val": ("ant", "bee")})
    flags = ["--data", str(root), *TINY, "--batch-size", "2"]
    straight, part = tmp_path / "straight", tmp_path / "part"
    assert main(["train", *flags, "--image-size", "8", "--epochs", "2", "--output", str(straight)]) == 0
    assert main(["train", *flags, "--image-size", "8", "--epochs", "1", "--output", str(part)]) == 0
    assert main(["train", *flags, "--epochs", "2", "--resume", str(part)]) == 0
    a, b = _state(straight / "last.pt"), _state(part / "last.pt")
    assert b["image_size"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_other_steps_per_epoch_keeps_the_epoch(tmp_path):
    """The schedule resumes at the completed epochs, whatever the steps per epoch now (a --batch-size given
    on resume, or --max-steps-per-epoch left out): the saved step count would mean another epoch."""
    from cspmirror.train.data import DataConfig
    from cspmirror.train.engine import TrainConfig, prepare

    out = tmp_path / "run"
    assert main(["train", "--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "32",
                 "--synthetic-val", "16", *TINY, "--schedule", "cosine", "--epochs", "4",
                 "--max-steps-per-epoch", "1", "--batch-size", "8", "--output", str(out)]) == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["epoch"], ckpt["history"] = 2, ckpt["history"][:2]  # as if stopped after epoch 2 (of 1 step each)
    ckpt["scheduler"]["last_epoch"] = 2
    torch.save(ckpt, out / "mid.pt")
    data = DataConfig(format="synthetic", image_size=16, synthetic_train=32, synthetic_val=16, workers=0)
    run = prepare(TrainConfig(output=str(tmp_path / "resumed"), data=data, resume=str(out / "mid.pt"),
                              recipe_overrides=dict(batch_size=8), progress=False, verbose=False))
    assert run.steps == 4 and run.scheduler.last_epoch == 8
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(ckpt["recipe"]["lr"] * 0.5)  # epoch 2 of 4


def test_an_unreadable_image_is_named(tmp_path):
    """PIL names no file for a truncated PNG; the reader does."""
    from PIL import Image

    from cspmirror.train.data import DataConfig, build_datasets

    root = _imagefolder(tmp_path / "data", {"train": ("cat", "dog"), "val": ("cat", "dog")})
    bad = root / "train" / "dog" / "bad.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad)
    bad.write_bytes(bad.read_bytes()[:4000])  # the header intact, the pixels cut short
    data = build_datasets(DataConfig(format="imagefolder", root=str(root), image_size=8, workers=0))
    index = [path for path, _ in data.train.samples].index(str(bad))
    with pytest.raises(OSError, match="cannot read image .*bad.png"):
        data.train[index]


def test_hidden_folders_are_no_classes(tmp_path):
    """A hidden folder beside the classes (Jupyter's .ipynb_checkpoints) was a class: torchvision's "Found no
    valid file for the classes .ipynb_checkpoints" when empty, one class too many (labels shifted) when not."""
    from PIL import Image

    from cspmirror.train.data import DataConfig, DataNotFoundError, build_datasets, resolve_format

    root = _imagefolder(tmp_path / "data", {"train": ("cat", "dog"), "val": ("cat", "dog")})
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / ".hidden" / "0.png")
    data = build_datasets(DataConfig(format="imagefolder", root=str(root), image_size=8, workers=0))
    assert data.train.classes == data.val.classes == ["cat", "dog"] and len(data.val) == 4
    only_hidden = _imagefolder(tmp_path / "hidden", {"train": (".git",)})
    with pytest.raises(DataNotFoundError, match="holds neither CIFAR-10's batches nor an ImageFolder tree"):
        resolve_format(DataConfig(root=str(only_hidden)))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit grayscale: a 0..65535 ramp came out almost all white."""
    from PIL import Image

    from cspmirror.train.data import DataConfig, build_split

    root = _imagefolder(tmp_path / "data", {"val": ("cat", "dog")})
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(ramp).save(root / "val" / "cat" / "0.png")
    assert Image.open(root / "val" / "cat" / "0.png").mode == "I;16"
    data = build_split(DataConfig(format="imagefolder", root=str(root), image_size=16, workers=0), "val")
    image, _ = data[0]
    assert torch.equal(image[0], torch.arange(256, dtype=torch.uint8).reshape(16, 16))


def test_eval_reads_only_its_split_and_checks_the_class_names(tmp_path, capsys):
    """A val/ folder alone can be evaluated; renamed class folders would map the labels to other outputs: an
    error, not a silently wrong accuracy."""
    root = _imagefolder(tmp_path / "data", {"train": ("ant", "bee"), "val": ("ant", "bee")})
    flags = ["--data", str(root), "--data-format", "imagefolder", "--image-size", "8"]
    assert main(["train", *flags, *TINY, "--epochs", "1", "--batch-size", "2", "--output", str(tmp_path / "run")]) == 0
    shutil.rmtree(root / "train")
    evaluate = ["eval", "--checkpoint", str(tmp_path / "run"), *flags, "--workers", "0", "--no-progress"]
    assert main(evaluate) == 0
    (root / "val" / "ant").rename(root / "val" / "zebra")
    assert main(evaluate) == 2
    assert "are not the checkpoint's" in capsys.readouterr().err


def test_data_format_is_found_from_the_folder(cifar_root, tmp_path):
    """--data-format auto (the default): CIFAR-10's batches (in cifar-10-batches-py/ or the folder itself) or an
    ImageFolder tree (one split is enough: eval reads one); the format found sets the image size and the
    normalisation. Was: cifar10 whatever the folder held."""
    from cspmirror.train.data import CIFAR10_MEAN, IMAGENET_MEAN, DataConfig, build_datasets, resolve_format

    tree = _imagefolder(tmp_path / "tree", {"train": ("cat", "dog"), "val": ("cat", "dog")})
    val_only = _imagefolder(tmp_path / "val_only", {"val": ("cat",)})
    flat = cifar_root / "cifar-10-batches-py"
    assert DataConfig().format == "auto"
    for root, fmt in ((cifar_root, "cifar10"), (flat, "cifar10"), (tree, "imagefolder"), (val_only, "imagefolder")):
        assert resolve_format(DataConfig(root=str(root))).format == fmt, root
    bundle = build_datasets(DataConfig(root=str(tree), workers=0))
    assert bundle.image_size == 224 and bundle.mean == IMAGENET_MEAN
    bundle = build_datasets(DataConfig(root=str(flat), workers=0))
    assert bundle.image_size == 32 and bundle.mean == CIFAR10_MEAN and len(bundle.train) == N_TRAIN


def test_an_imagefolder_tree_needs_no_data_format(tmp_path):
    """train, eval and ablate on an ImageFolder tree without --data-format (was: "CIFAR-10 is missing ..."); the
    checkpoint and the ablation report keep the format found, not "auto"."""
    root = _imagefolder(tmp_path / "data", {"train": ("ant", "bee"), "val": ("ant", "bee")})
    out = tmp_path / "run"
    flags = ["--data", str(root), "--image-size", "8", *TINY, "--epochs", "1", "--batch-size", "2"]
    assert main(["train", *flags, "--output", str(out)]) == 0
    assert _state(out / "last.pt")["args"]["data"]["format"] == "imagefolder"
    assert json.loads((out / "config.json").read_text())["args"]["data"]["format"] == "imagefolder"
    assert main(["eval", "--checkpoint", str(out), "--data", str(root), "--workers", "0", "--no-progress"]) == 0
    abl = tmp_path / "abl"
    assert main(["ablate", "--grid", "overlap=0", *flags, "--max-steps-per-epoch", "1", "--output", str(abl)]) == 0
    assert "data `imagefolder`" in (abl / "ablation.md").read_text()


@pytest.mark.parametrize("command", ["train", "ablate", "eval"])
def test_help_describes_the_defaults(command, capsys):
    """--data-format defaults to auto; --warmup-epochs says how a preset's warm-up fits a short run."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "auto (default: cifar10 or imagefolder, whichever ROOT holds)" in text
    assert command == "eval" or "a preset's is at most 20% of the run" in text


def test_resume_keeps_the_warmup_of_a_short_modern_run(tmp_path, capsys):
    """A 1-epoch modern run warms up for a fifth of it (was: 5 epochs, never left); extended twice with
    --recipe modern given again, it keeps that warm-up and agrees with the preset (whose warm-up for 2 or 3
    epochs would be longer); the run says how long its warm-up is."""
    out = tmp_path / "run"
    flags = ["--data-format", "synthetic", "--image-size", "16", "--synthetic-train", "32", "--synthetic-val", "16",
             *TINY, "--recipe", "modern", "--output", str(out)]
    assert main(["train", *flags, "--epochs", "1"]) == 0
    assert "warm-up 0.2 epochs" in capsys.readouterr().out
    for epochs in ("2", "3"):
        assert main(["train", *flags, "--epochs", epochs, "--resume"]) == 0, capsys.readouterr().err
    recipe = _state(out / "last.pt")["recipe"]
    assert recipe["epochs"] == 3 and recipe["warmup_epochs"] == pytest.approx(0.2)
    # another preset is still refused
    assert main(["train", *flags, "--epochs", "4", "--resume", "--recipe", "paper"]) == 2
    assert "--recipe paper: the checkpoint's recipe differs in" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(("warmup", "steps"), [(0.5, 3), (1.5, 3), (0.3, 7), (2.0, 5)])
def test_warmup_rises_to_the_peak_and_never_past_it(warmup, steps):
    """A warm-up of a fractional number of steps once gave 1.33x the peak learning rate."""
    recipe = recipes.get_recipe("modern", epochs=3, warmup_epochs=warmup)
    factors = [recipes.lr_factor(recipe, step, steps) for step in range(3 * steps)]
    rising = factors[: math.ceil(warmup * steps)]
    assert max(factors) <= 1.0 and rising == sorted(rising)


@pytest.mark.parametrize("field", ["lr", "weight_decay", "gamma", "warmup_epochs", "grad_clip"])
@pytest.mark.parametrize("value", [math.inf, 1e39])
def test_recipe_rejects_non_finite_values(field, value):
    """1e39 is finite for Python but not in float32, where the optimizer applies it: --lr 1e39 was a traceback
    ("value cannot be converted to type float without overflow") at the first step."""
    with pytest.raises(recipes.RecipeError, match=f"--{field.replace('_', '-')}"):
        recipes.Recipe(**{field: value})


def test_step_schedule_equals_steplr():
    recipe = recipes.Recipe(epochs=8, step_size=2, gamma=0.5)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=recipe.lr)
    ours = recipes.build_scheduler(opt, recipe, steps_per_epoch=3)
    ref = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for _epoch in range(8):
        for _ in range(3):
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
            opt.step()
            ours.step()
        ref_opt.step()
        ref.step()


def test_step_schedule_after_a_warmup_is_one_factor_per_epoch():
    """The warm-up ends where its last epoch does: from then on each epoch has one factor, the step schedule's
    (its decays counted from the run's first epoch), the epoch right after the warm-up included."""
    recipe = recipes.Recipe(epochs=4, step_size=1, gamma=0.5, warmup_epochs=1)
    factors = [recipes.lr_factor(recipe, s, 4) for s in range(16)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0] + [0.5] * 4 + [0.25] * 4 + [0.125] * 4)


def test_cosine_with_warmup():
    recipe = recipes.RECIPES["modern"].with_overrides(epochs=10, warmup_epochs=2)
    factors = [recipes.lr_factor(recipe, s, 10) for s in range(100)]
    assert factors[0] == pytest.approx(1 / 20) and factors[19] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:19], factors[1:20], strict=True))  # warm-up rises
    assert all(a >= b for a, b in zip(factors[20:-1], factors[21:], strict=True))  # cosine falls
    assert factors[-1] < 0.01


def test_cosine_falls_from_the_peak_to_the_min_lr_ratio():
    recipe = recipes.RECIPES["modern"].with_overrides(epochs=4, warmup_epochs=0, min_lr_ratio=0.1)
    factors = [recipes.lr_factor(recipe, s, 2) for s in range(9)]
    assert factors[0] == pytest.approx(1.0) and factors[4] == pytest.approx(0.55) and factors[8] == pytest.approx(0.1)


@pytest.mark.parametrize(("epochs", "warmup"), [(1, 0.2), (3, 0.6), (5, 1.0), (10, 2.0), (25, 5.0), (100, 5.0)])
def test_modern_warmup_fits_a_short_run(epochs, warmup):
    """The modern preset's 5 warm-up epochs take at most a fifth of the run: a run of 5 epochs or less never
    left them (its learning rate never at the peak, its cosine never started). A --warmup-epochs given is kept."""
    recipe = recipes.get_recipe("modern", epochs=epochs)
    assert recipe.warmup_epochs == pytest.approx(warmup)
    factors = [recipes.lr_factor(recipe, step, 20) for step in range(20 * epochs)]
    assert max(factors) == pytest.approx(1.0) and factors[-1] < 0.05  # the peak, then the cosine down to ~0
    assert recipes.get_recipe("modern", epochs=epochs, warmup_epochs=0.5).warmup_epochs == 0.5


def test_recipe_overrides_and_validation():
    r = recipes.get_recipe("paper", lr=0.01, epochs=None)
    assert r.lr == 0.01 and r.epochs == 100 and r.step_size == 25 and r.gamma == 0.5 and not r.augment
    with pytest.raises(ValueError, match="weight_decay"):
        recipes.get_recipe("paper", weight_decay=-1.0)
    with pytest.raises(ValueError, match="unknown recipe field"):
        recipes.get_recipe("paper", learning_rate=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        recipes.get_recipe("paper", nesterov=True, momentum=0.0)
    with pytest.raises(ValueError, match="--no-nesterov"):
        recipes.get_recipe("modern", optimizer="adamw", nesterov=True)
    # the modern preset's Nesterov goes with its SGD: --optimizer adamw (as recipes.py suggests) just works
    assert not recipes.get_recipe("modern", optimizer="adamw", lr=2e-3).nesterov
    assert not recipes.get_recipe("modern", momentum=0.0).nesterov
    with pytest.raises(ValueError, match=r"amp_dtype \(--amp-dtype\) bf16 needs --amp"):  # was ignored
        recipes.get_recipe("paper", amp_dtype="bf16")
    assert recipes.get_recipe("paper", amp=True, amp_dtype="bf16").amp_dtype == "bf16"
    groups = recipes.param_groups(torch.nn.Conv2d(3, 4, 3), recipes.RECIPES["modern"])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] and groups[1]["params"][0].ndim == 1


@pytest.mark.parametrize(("field", "value"), [("momentum", 1.0), ("label_smoothing", 1.0), ("drop_rate", 1.0),
                                            ("drop_path_rate", 1.0), ("lr", 0.0), ("gamma", 0.0)])
def test_recipe_rejects_the_open_end_of_a_range(field, value):
    """Momentum 1 never forgets a gradient (the steps grow without bound); smoothing or dropout 1 leave nothing."""
    with pytest.raises(recipes.RecipeError, match=f"--{field.replace('_', '-')}"):
        recipes.Recipe(**{field: value})


def test_every_model_flag_is_a_knob_and_ablate_defaults_to_a_few_epochs():
    from cspmirror.cli import build_parser
    from cspmirror.commands.ablate import DEFAULT_EPOCHS
    from cspmirror.train.cli_args import model_knobs

    args = build_parser().parse_args(["train", "--overlap", "0.5", "--axis", "-2", "--no-mirror", "--no-siamese",
                                      "--reduce", "mean", "--fusion", "concat_first", "--split-stages", "none"])
    knobs = model_knobs(args)
    assert not any(knobs.pop("split_stages"))
    assert knobs == dict(overlap=0.5, axis=-2, mirror=False, siamese=False, reduce="mean", fusion="concat_first")
    assert build_parser().parse_args(["ablate"]).epochs == DEFAULT_EPOCHS == 3  # not the recipe's 100


def test_parse_grid():
    points = ablation.parse_grid("overlap=0,0.5; mirror=true,false; split_stages=all,none,0+1")
    assert len(points) == 12
    assert points[0] == {"overlap": 0.0, "mirror": True, "split_stages": None}
    assert points[-1] == {"overlap": 0.5, "mirror": False, "split_stages": [0, 1]}
    assert ablation.point_label({"split_stages": []}) == "split_stages=none"
    with pytest.raises(ValueError, match="unknown knob 'colour'"):
        ablation.parse_grid("colour=red")
    with pytest.raises(ValueError, match="mirror"):
        ablation.parse_grid("mirror=maybe")
    with pytest.raises(ValueError, match="knob 'split_stages'.* got ''"):  # was a "none" point, silently
        ablation.parse_grid("split_stages=all,")


def test_grid_values_are_checked_where_preset_points_are():
    """parse_grid only parses; whether a value fits the model is point_knobs's check, for grid and preset points
    alike (the values were checked twice: in parse_grid, then again in point_knobs)."""
    (point,) = ablation.parse_grid("overlap=2;axis=0;reduce=max;fusion=late")
    assert point == {"overlap": 2.0, "axis": 0, "reduce": "max", "fusion": "late"}
    for knob, value in point.items():
        with pytest.raises(ValueError, match=f"ablation point '{knob}=.*': {knob} must"):
            ablation.point_knobs("cspmirrornet_tiny", {}, {knob: value})


def test_synthetic_patterns_are_deterministic():
    a, b = SyntheticPatterns(8, 3, 16, seed=5), SyntheticPatterns(8, 3, 16, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, SyntheticPatterns(8, 3, 16, seed=6).images)


def test_augmentation_keeps_uint8_images():
    from cspmirror.train.data import train_transform

    torch.manual_seed(0)
    ds = SyntheticPatterns(4, 3, 16, seed=1, transform=train_transform(True, 16))
    changed = 0
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        changed += int(not torch.equal(image, ds.images[i]))
    assert changed > 0
    assert train_transform(False, 16) is None  # the paper recipe: no augmentation


# ------------------------------------------------------------------------------------------ run folders


def test_a_new_run_never_overwrites_another(tmp_path, capsys):
    """A second train into a folder holding a run goes to the next free numbered sibling (as Ultralytics): it
    overwrote the first run's checkpoints, metrics and plots without a word. --exist-ok writes there as before;
    an empty or unrelated folder is used as it is."""
    out = tmp_path / "train"
    assert main(["train", *SYN, "--output", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "train3").mkdir()
    (tmp_path / "train3" / "notes.txt").write_text("not a run\n")  # unrelated: used as it is
    capsys.readouterr()
    for expected in ("train2", "train3"):
        assert main(["train", *SYN, "--output", str(out)]) == 0
        stdout = capsys.readouterr().out
        assert f"this one goes to {tmp_path / expected}" in stdout and f"run folder: {tmp_path / expected}" in stdout
        assert (tmp_path / expected / "last.pt").is_file()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert main(["train", *SYN, "--output", str(out), "--exist-ok"]) == 0
    assert not (tmp_path / "train4").exists() and f"run folder: {out}\n" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["train", *SYN, "--output", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "last.pt").is_file() and not (tmp_path / "empty2").exists()


def test_a_new_ablation_never_overwrites_another(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--synthetic", "--grid", "overlap=0", *SYN, "--max-steps-per-epoch", "1", "--output", str(out)]
    assert main(args) == 0
    before = (out / "ablation.csv").read_bytes()
    assert main(args) == 0
    assert f"table and plot in {tmp_path / 'abl2'}" in capsys.readouterr().out.replace("table in", "table and plot in")
    assert (out / "ablation.csv").read_bytes() == before and (tmp_path / "abl2" / "ablation.csv").is_file()
    assert main([*args, "--exist-ok"]) == 0 and not (tmp_path / "abl3").exists()
    assert "read from its run" not in capsys.readouterr().out  # a new ablation: every point trains again


def test_a_run_folder_given_as_dot_is_numbered_by_its_name(tmp_path, monkeypatch):
    """``--output .`` in a folder holding a run: "." has no name to number, the folder's own name is numbered."""
    from cspmirror.train.cli_args import new_run_folder

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").touch()
    monkeypatch.chdir(tmp_path / "run")
    assert new_run_folder(".", ["last.pt"]) == str(tmp_path / "run2")
    assert new_run_folder(".", ["last.pt"], exist_ok=True) == "." and new_run_folder(".", ["best.pt"]) == "."


def test_a_numbered_folder_is_no_file_and_dot_dot_is_numbered_as_its_folder(tmp_path, monkeypatch):
    """A file runs/train2 was chosen (then 'cannot create the folder' named a --output never given); --output ..
    went to a folder '..2' inside the working directory, not to the sibling of the folder '..' names."""
    from cspmirror.train.cli_args import new_run_folder

    run = tmp_path / "train"
    (run / "sub").mkdir(parents=True)
    (run / "last.pt").write_text("a run")
    (tmp_path / "train2").write_text("a file")
    assert new_run_folder(str(run), ["last.pt"]) == str(tmp_path / "train3")
    monkeypatch.chdir(run / "sub")
    assert new_run_folder("..", ["last.pt"]) == str(tmp_path / "train3")


def test_a_run_resumed_into_another_runs_folder_does_not_overwrite_it(tmp_path, capsys):
    """--resume B --output A where A holds another run (not further along): A's checkpoints, metrics and plots were
    overwritten without a word. It goes to A2 as a new run would (--exist-ok: into A); in its own folder it goes on."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *SYN, "--seed", "1", "--output", str(a)]) == 0
    assert main(["train", *SYN, "--seed", "2", "--output", str(b)]) == 0
    first = {p.name: p.read_bytes() for p in a.iterdir()}
    capsys.readouterr()
    assert main(["train", *SYN, "--epochs", "2", "--resume", str(b / "last.pt"), "--output", str(a)]) == 0
    assert f"this one goes to {tmp_path / 'a2'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in a.iterdir()} == first and _state(tmp_path / "a2" / "last.pt")["epoch"] == 2
    assert main(["train", *SYN, "--epochs", "2", "--resume", str(b), "--output", f"{b}/"]) == 0  # its own folder
    assert _state(b / "last.pt")["epoch"] == 2 and not (tmp_path / "b2").exists()


def test_ablate_resume_refuses_points_trained_otherwise(tmp_path, capsys):
    """ablate --resume without the --no-mirror the ablation was started with read its points (trained without
    mirroring) as if they were the grid's over the default knobs, and the table said so; other flags alike."""
    args = ["ablate", "--synthetic", "--grid", "overlap=0", *SYN, "--max-steps-per-epoch", "1", "--output",
            str(tmp_path / "abl"), "--resume"]
    assert main([*args[:-1], "--no-mirror"]) == 0
    assert main([*args, "--no-mirror"]) == 0
    capsys.readouterr()
    for changed, said in (([], "with knobs {'mirror': False, 'overlap': 0.0} there"),
                          (["--no-mirror", "--seed", "4"], "seed (--seed) 3 there, 4 now"),
                          (["--no-mirror", "--image-size", "24"], "image size (--image-size) 16 there, 24 now")):
        assert main([*args, *changed]) == 2
        assert said in capsys.readouterr().err


def _fixed_val_acc(monkeypatch, *values: float) -> None:
    """The validation top-1 of the next epochs, in order (the training itself runs)."""
    from cspmirror.train import engine

    accs = iter(values)
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: dict(loss=1.0, top1=next(accs), top5=100.0, count=16))


def test_resume_into_another_folder_carries_the_best(tmp_path, monkeypatch, capsys):
    """--resume RUN/last.pt --output NEW: NEW had no best.pt when the resumed epochs did not beat the best so far
    (it was in RUN only). The best epoch's checkpoint is carried over: RUN's best.pt when it is this run's at that
    epoch, or the checkpoint resumed when its last epoch is the best; when neither exists, a note says so."""
    run = tmp_path / "run"
    _fixed_val_acc(monkeypatch, 50.0, 40.0)  # best at epoch 1, not the last
    assert main(["train", *SYN, "--epochs", "2", "--output", str(run)]) == 0
    assert _state(run / "best.pt")["epoch"] == 1
    _fixed_val_acc(monkeypatch, 30.0)
    new = tmp_path / "new"
    assert main(["train", *SYN, "--epochs", "3", "--resume", str(run / "last.pt"), "--output", str(new)]) == 0
    assert (new / "best.pt").read_bytes() == (run / "best.pt").read_bytes()
    assert _state(new / "last.pt")["best_val_acc"] == 50.0

    _fixed_val_acc(monkeypatch, 30.0, 30.0)  # the checkpoint resumed is the best epoch's itself (epoch 1 of 3)
    from_best = tmp_path / "from_best"
    assert main(["train", *SYN, "--epochs", "3", "--resume", str(run / "best.pt"), "--output", str(from_best)]) == 0
    assert (from_best / "best.pt").read_bytes() == (run / "best.pt").read_bytes()

    other = tmp_path / "other"  # another run's best.pt at the same epoch (another seed): not this run's best
    _fixed_val_acc(monkeypatch, 50.0, 40.0)
    assert main(["train", *SYN, "--epochs", "2", "--seed", "1", "--output", str(other)]) == 0
    shutil.copyfile(other / "best.pt", run / "best.pt")
    _fixed_val_acc(monkeypatch, 30.0)
    foreign = ["--resume", str(run / "last.pt"), "--output", str(tmp_path / "foreign")]
    assert main(["train", *SYN, "--epochs", "3", *foreign]) == 0
    assert not (tmp_path / "foreign" / "best.pt").exists()

    (run / "best.pt").unlink()  # nothing to carry: said, and best.pt comes with a better epoch
    _fixed_val_acc(monkeypatch, 30.0)
    capsys.readouterr()
    assert main(["train", *SYN, "--epochs", "3", "--resume", str(run), "--output", str(tmp_path / "lost")]) == 0
    assert "no checkpoint of the best epoch so far (epoch 1, val top-1 50.00%)" in capsys.readouterr().out
    assert not (tmp_path / "lost" / "best.pt").exists()


def test_eval_names_where_the_image_size_came_from(cifar_root, tmp_path, capsys):
    """A checkpoint trained at 16 evaluated on CIFAR-10 (32x32): the error blamed --image-size, not given."""
    run = tmp_path / "run"
    assert main(["train", *SYN, "--output", str(run)]) == 0
    base = ["eval", "--checkpoint", str(run), "--data", str(cifar_root), "--workers", "0", "--no-progress"]
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "CIFAR-10 images are 32x32; the checkpoint's image size" in err and "(--image-size)" not in err, err
    assert main([*base, "--image-size", "16"]) == 2
    assert "image_size (--image-size) must be 32, got 16" in capsys.readouterr().err


# ------------------------------------------------------------------------------- mutation testing, round 3


def _linear_env():
    """A linear classifier over 2x2 RGB images (12 inputs, 7 classes) and the StepEnv of a CPU step."""
    from cspmirror.train.engine import StepEnv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    env = StepEnv(torch.device("cpu"), torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25), progress=False)
    return model, env


def _uneven_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 5, 3 and 1 random images (labels 0..6): a mean per batch is not the mean per sample."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8),
             torch.randint(0, 7, (n,), generator=g)) for n in (5, 3, 1)]


def test_evaluate_counts_every_sample_alike():
    """Loss, top-1 and top-5 are means over samples (batches of other sizes), top-5 of 7 classes is not top-4 or
    any class, and ``max_batches`` evaluates that many batches."""
    from cspmirror.train.data import to_input
    from cspmirror.train.engine import evaluate

    model, env = _linear_env()
    batches, rank = [], 0
    for images, _ in _uneven_batches():  # labels the model ranks 1st, 2nd, ..., 7th, 1st, ... (top-5 not top-4)
        with torch.no_grad():
            order = model(to_input(images, env.mean, env.std)).argsort(1, descending=True)
        ranks = torch.arange(rank, rank + len(images)) % 7
        batches.append((images, order.gather(1, ranks[:, None])[:, 0]))
        rank += len(images)
    for limit in (None, 2):
        seen = batches[:limit]
        x, y = torch.cat([b[0] for b in seen]), torch.cat([b[1] for b in seen])
        with torch.no_grad():
            logits = model(to_input(x, env.mean, env.std))
        ranks = (logits > logits.gather(1, y[:, None])).sum(1)  # classes scored above the label
        got = evaluate(model, batches, env, max_batches=limit)
        assert got["count"] == len(y)
        assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
        assert got["top1"] == pytest.approx(100 * (ranks == 0).double().mean().item())
        assert got["top5"] == pytest.approx(100 * (ranks < 5).double().mean().item())
        assert (ranks == 4).any() and (ranks > 4).any() and (ranks == 1).any()


def _one_step(grad_clip: float, batches: list, lr: float = 1.0, scaler: torch.amp.GradScaler | None = None
              ) -> tuple[torch.nn.Module, dict]:
    """The model of :func:`_linear_env` after an epoch of plain SGD over ``batches``, and the epoch's metrics."""
    from cspmirror.train.engine import train_one_epoch

    model, env = _linear_env()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    metrics = train_one_epoch(model, batches, opt, sched, scaler, torch.nn.CrossEntropyLoss(), env,
                              steps=len(batches), grad_clip=grad_clip)
    return model, metrics


def _moved(model: torch.nn.Module) -> torch.Tensor:
    """How far ``model``'s parameters are from those :func:`_linear_env` starts with, flattened."""
    start = _linear_env()[0]
    return torch.cat([(p - q).detach().flatten() for p, q in zip(model.parameters(), start.parameters(),
                                                                 strict=True)])


def test_grad_clip_bounds_the_step():
    """With SGD (lr 1, no momentum), one step moves the parameters by the gradient: clipped to norm ``grad_clip``
    when given (same direction), untouched with 0."""
    batch = _uneven_batches()[:1]
    free = _moved(_one_step(0.0, batch)[0])
    clip = free.norm().item() / 4
    clipped = _moved(_one_step(clip, batch)[0])
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-4)
    assert torch.allclose(clipped, free / 4, atol=1e-6)


def test_grad_scaler_is_updated_and_unscaled_before_clipping():
    """A gradient scaler (fp16 AMP on CUDA; enabled here on the CPU) adapts its scale after every step, and the
    clip applies to the unscaled gradient: the same step as without a scaler."""
    batch = _uneven_batches()[:1]
    free = _moved(_one_step(0.0, batch)[0])
    clip = free.norm().item() / 4
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    clipped = _moved(_one_step(clip, batch, scaler=scaler)[0])
    assert scaler.get_scale() == 2048.0
    assert torch.allclose(clipped, free / 4, atol=1e-6)


def test_training_metrics_are_means_over_samples():
    """The training loss and accuracy of an epoch weigh each batch by its size (lr 0: the model does not move)."""
    from cspmirror.train.data import to_input

    batches = _uneven_batches()
    model, metrics = _one_step(0.0, batches, lr=0.0)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    env = _linear_env()[1]
    with torch.no_grad():
        logits = model(to_input(x, env.mean, env.std))
    assert metrics["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["acc"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item())


def test_optimizer_follows_the_recipe():
    """SGD's Nesterov flag, AdamW's beta1 (the recipe's momentum), and weight decay on conv and linear weights alike
    (only 1-D parameters are left out with decay_norm_and_bias=False)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    sgd = recipes.build_optimizer(model, recipes.RECIPES["modern"])
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    decayed, free = sgd.param_groups
    assert {p.ndim for p in decayed["params"]} == {4, 2} and {p.ndim for p in free["params"]} == {1}
    adamw = recipes.build_optimizer(model, recipes.get_recipe("paper", optimizer="adamw", momentum=0.8))
    assert adamw.defaults["betas"] == (0.8, 0.999)


def test_augmentation_is_crop_of_an_eighth_and_horizontal_flip():
    """The recipe's augmentation: random crop with padding size/8 (4 at 32x32) and a horizontal flip; the
    validation split is never augmented, whatever ``augment`` says."""
    from torchvision.transforms import v2

    from cspmirror.train.data import DataConfig, build_split, train_transform

    crop, flip = train_transform(True, 32).transforms
    assert isinstance(crop, v2.RandomCrop) and crop.padding == [4, 4, 4, 4]
    assert type(flip) is v2.RandomHorizontalFlip
    cfg = DataConfig(format="synthetic", image_size=16, synthetic_train=8, synthetic_val=8)
    assert build_split(cfg, "val", augment=True).transform is None
    assert build_split(cfg, "train", augment=True).transform is not None


def test_synthetic_validation_images_are_not_the_training_images():
    from cspmirror.train.data import DataConfig, build_datasets

    bundle = build_datasets(DataConfig(format="synthetic", image_size=16, synthetic_train=8, synthetic_val=8))
    assert not torch.equal(bundle.train.images, bundle.val.images)


def test_imagefolder_images_are_square_crops(tmp_path):
    """A 20x24 image at --image-size 16: resized to 16 on its shorter side, then centre-cropped to 16x16 (also
    in the validation split, which is never augmented, so has no random crop to make it square)."""
    from PIL import Image

    from cspmirror.train.data import DataConfig, build_split

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (24, 20), (10, 20, 30)).save(tmp_path / split / "a" / "0.png")
    cfg = DataConfig(format="imagefolder", root=str(tmp_path), image_size=16)
    for split in ("train", "val"):
        assert build_split(cfg, split, augment=True)[0][0].shape == (3, 16, 16)
    assert "RandomCrop" not in repr(build_split(cfg, "val", augment=True).transform)  # never augmented


def test_the_best_checkpoint_is_the_first_epoch_at_the_best_and_survives_a_resume(tmp_path, monkeypatch):
    """best.pt is the first epoch reaching the best top-1 (a later tie does not replace it), and a resumed run
    keeps the best so far: a worse resumed epoch does not replace it either."""
    run = tmp_path / "run"
    _fixed_val_acc(monkeypatch, 50.0, 50.0)
    assert main(["train", *SYN, "--epochs", "2", "--output", str(run)]) == 0
    assert _state(run / "best.pt")["epoch"] == 1
    _fixed_val_acc(monkeypatch, 40.0)
    assert main(["train", *SYN, "--epochs", "3", "--resume", str(run)]) == 0
    assert _state(run / "best.pt")["epoch"] == 1 and _state(run / "last.pt")["best_val_acc"] == 50.0


def test_resume_applies_the_new_lr_and_weight_decay(tmp_path):
    """--lr and --weight-decay given on resume replace the checkpoint's, from the first resumed step on (a step
    schedule halving the lr every epoch)."""
    run = tmp_path / "run"
    flags = [*SYN, "--step-size", "1", "--output", str(run)]
    assert main(["train", *flags]) == 0
    assert main(["train", *flags, "--epochs", "3", "--resume", "--lr", "0.04", "--weight-decay", "0.001"]) == 0
    assert [r["lr"] for r in read_csv(run / "metrics.csv")] == pytest.approx([0.1, 0.02, 0.01])
    groups = _state(run / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.001] and groups[0]["lr"] == pytest.approx(0.005)


def test_every_epoch_reshuffles_and_reseeds(tmp_path, monkeypatch):
    """Epoch e shuffles with DistributedSampler.set_epoch(e) and seeds the RNGs with epoch_seed(seed, e, rank)."""
    from torch.utils.data import DistributedSampler

    from cspmirror.train import engine

    epochs, seeds = [], []
    set_epoch, seed_everything = DistributedSampler.set_epoch, engine.seed_everything
    monkeypatch.setattr(DistributedSampler, "set_epoch", lambda self, e: epochs.append(e) or set_epoch(self, e))
    monkeypatch.setattr(engine, "seed_everything", lambda s: seeds.append(s) or seed_everything(s))
    assert main(["train", *SYN, "--epochs", "2", "--output", str(tmp_path / "run")]) == 0
    assert epochs == [0, 1] and seeds[-2:] == [engine.epoch_seed(3, e, 0) for e in (0, 1)]


def test_max_steps_per_epoch_caps_the_steps(tmp_path):
    """--max-steps-per-epoch 1 of 2 batches: one optimizer (and scheduler) step per epoch."""
    run = tmp_path / "run"
    assert main(["train", *SYN, "--max-steps-per-epoch", "1", "--output", str(run)]) == 0
    assert _state(run / "last.pt")["scheduler"]["last_epoch"] == 1
