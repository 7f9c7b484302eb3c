"""Datasets for training and evaluation, all read from local disk (nothing is ever downloaded).

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor [3, H, W]; normalisation to float
happens on the device, per batch (:func:`to_input`), which keeps data loading cheap.

Formats (``DataConfig.format``):

- ``auto`` (the default): ``cifar10`` or ``imagefolder``, whichever layout ``ROOT`` holds (:func:`resolve_format`).
- ``cifar10``: the "python version" of CIFAR-10 as it is distributed (``cifar-10-python.tar.gz``, extracted):
  ``ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` (or those files in ``ROOT`` itself),
  pickled dicts with ``data`` (uint8 [n, 3072], channel-major rows) and ``labels``; the same files
  ``torchvision.datasets.CIFAR10(ROOT)`` reads (we skip its MD5 check so that subsets in the same format work too).
- ``imagefolder``: ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/val/<class>/...`` (torchvision ImageFolder);
  images are resized (shorter side) and centre-cropped to ``image_size``.
- ``synthetic``: :class:`SyntheticPatterns`, generated in memory from a seed (for tests and smoke runs).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

AUTO = "auto"  # the default format: whichever of cifar10 and imagefolder the folder holds
FORMATS = (AUTO, "cifar10", "imagefolder", "synthetic")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataNotFoundError(FileNotFoundError):
    """The dataset is not where it was looked for; the message says where to put it and in which format."""


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to read it.

    ``image_size`` None means 32 for cifar10/synthetic and 224 for imagefolder. ``format`` ``auto`` is resolved
    from the folder's contents by :func:`resolve_format` (every reader here resolves it first).
    """

    format: str = AUTO
    root: str | None = None
    image_size: int | None = None
    workers: int = 2
    synthetic_classes: int = 4
    synthetic_train: int = 512
    synthetic_val: int = 128
    synthetic_seed: int = 1234
    image_size_origin: str = "image_size (--image-size)"  # what errors call image_size: where it came from

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data format (--data-format) must be one of {FORMATS}, got {self.format!r}")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"{self.image_size_origin} must be >= 1, got {self.image_size}")
        if self.workers < 0:
            raise ValueError(f"workers (--workers) must be >= 0, got {self.workers}")
        if self.format == "synthetic" and self.root is not None:  # it would be ignored: no file is read
            raise ValueError(f"--data-format synthetic generates its data: leave out --data ({self.root})")
        if self.format == "synthetic" and not 2 <= self.synthetic_classes <= len(_PALETTE):
            raise ValueError(f"synthetic_classes (--synthetic-classes) must be in [2, {len(_PALETTE)}], "
                             f"got {self.synthetic_classes}")
        for name in ("synthetic_train", "synthetic_val"):
            if self.format == "synthetic" and getattr(self, name) < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}")

    @property
    def size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        if self.format == AUTO:  # a bug, not a user error: 32 or 224 depends on the format found
            raise ValueError("the default image size of format 'auto' depends on the data: resolve_format first")
        return 224 if self.format == "imagefolder" else 32


@dataclass
class DataBundle:
    """The two splits plus what a model and its checkpoint need to know about them."""

    train: Dataset
    val: Dataset
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------- messages


def _layouts(where: str) -> dict[str, list[str]]:
    """Per format read from a folder: the lines that describe its layout under ``where``."""
    return {
        "cifar10": [
            "Expected CIFAR-10 in its standard 'python version' format (cifar-10-python.tar.gz, extracted):",
            f"  {where}/{CIFAR10_DIR}/data_batch_1 ... data_batch_5, {CIFAR10_TEST}, {CIFAR10_META}",
            f"(the files torchvision.datasets.CIFAR10(root, download=False) reads; or those files in {where} itself).",
        ],
        "imagefolder": [
            "Expected an ImageFolder tree with train/ and val/ subfolders, one folder per class:",
            f"  {where}/train/<class>/<image>.png|jpg   and   {where}/val/<class>/<image>.png|jpg",
        ],
    }


def missing_data_message(fmt: str, root: str | None, problem: str) -> str:
    """What is wrong and where to put the data, in which format (cspmirror never downloads); ``auto`` lists
    every layout it recognises."""
    where = root if root is not None else "<not given: pass --data ROOT>"
    layouts = _layouts(where)
    lines = [f"{problem}", f"cspmirror never downloads data. Looked in: {where}"]
    if fmt == AUTO:
        lines.append("--data-format auto (the default) reads either of these layouts:")
    for name in layouts if fmt == AUTO else (fmt,):
        lines += layouts[name]
    lines.append("Other formats: --data-format cifar10 | imagefolder (or synthetic, for smoke tests).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CIFAR-10


def _read_pickle(path: Path, keys: tuple[str, ...]) -> dict:
    """The pickled dict at ``path``, holding every key of ``keys`` (``a|b``: either); ValueError naming the file
    when it is damaged (truncated, not a pickle) or holds something else."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - a damaged pickle raises many kinds
        raise ValueError(f"{path}: cannot be read as a CIFAR-10 python file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if not isinstance(entry, dict) or not any(a in entry for a in k.split("|"))]
    if missing:
        raise ValueError(f"{path}: not a CIFAR-10 python file (a pickled dict with {list(keys)}; "
                         f"missing {missing})")
    return entry


def _read_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One batch file: its images as uint8 rows [n, 3072] and its labels, checked (ValueError naming the file)."""
    entry = _read_pickle(path, ("data", "labels|fine_labels"))
    data = np.asarray(entry["data"])
    labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{path}: 'data' must be integer rows of 3072 values (3x32x32), got an array of "
                         f"{data.dtype} {list(data.shape)}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: 'data' must hold 8-bit values (0..255), got {data.min()}..{data.max()}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.astype(np.uint8, copy=False), [int(v) for v in labels]


class _InMemoryImages(Dataset):
    """Images held as one uint8 tensor ``images`` [n, 3, H, W] with ``targets`` [n]; items are (image, label)."""

    images: torch.Tensor
    targets: torch.Tensor
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def _holds_cifar10(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (*CIFAR10_TRAIN, CIFAR10_TEST))


def cifar10_folder(root: Path) -> Path:
    """The folder of CIFAR-10's batches under ``root``: ``root/cifar-10-batches-py`` as extracted, or ``root``
    itself when it holds them (the extracted folder given as ``--data``)."""
    nested = root / CIFAR10_DIR
    return root if not nested.is_dir() and _holds_cifar10(root) else nested


class CIFAR10Batches(_InMemoryImages):
    """CIFAR-10 from its pickled batches: ``train=True`` reads data_batch_1..5, else test_batch.

    Items are (uint8 [3, 32, 32], int label), with ``transform`` applied to the image.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Callable | None = None):
        folder = cifar10_folder(Path(root))
        names = CIFAR10_TRAIN if train else (CIFAR10_TEST,)
        missing = [n for n in (*names, CIFAR10_META) if not (folder / n).is_file()]
        if missing:
            raise DataNotFoundError(missing_data_message(
                "cifar10", str(root), f"CIFAR-10 is missing {', '.join(missing)} in {folder}."))
        self.classes = list(_read_pickle(folder / CIFAR10_META, ("label_names",))["label_names"])
        data, labels = [], []
        for name in names:
            rows, batch_labels = _read_batch(folder / name)
            bad = sorted({v for v in batch_labels if not 0 <= v < len(self.classes)})
            if bad:  # else an IndexError in the loss at the first step (a device-side assert on CUDA)
                raise ValueError(f"{folder / name}: labels {bad[:5]} are not in [0, {len(self.classes)}), the "
                                 f"{len(self.classes)} label_names of {folder / CIFAR10_META}")
            data.append(rows)
            labels.extend(batch_labels)
        self.images = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))
        self.targets = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform



# ----------------------------------------------------------------------------------------------- synthetic

# Distinct colours (RGB) for up to 8 synthetic classes.
_PALETTE = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40),
            (200, 60, 220), (40, 210, 210), (240, 140, 30), (250, 250, 250))


class SyntheticPatterns(_InMemoryImages):
    """A small learnable task: on a noisy grey background, a square patch whose colour is the class.

    The patch (side ``size // 2``) sits at a random position, so the task needs colour, not position.
    Deterministic for a ``seed``; items are (uint8 [3, size, size], label).
    """

    def __init__(self, n: int, num_classes: int = 4, size: int = 32, seed: int = 0,
                 transform: Callable | None = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 2 <= num_classes <= len(_PALETTE):
            raise ValueError(f"num_classes must be in [2, {len(_PALETTE)}], got {num_classes}")
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (n,), generator=g)
        images = torch.randint(60, 180, (n, 1, size, size), generator=g).expand(n, 3, size, size).clone()
        side = max(size // 2, 1)
        corners = torch.randint(0, size - side + 1, (n, 2), generator=g)
        palette = torch.tensor(_PALETTE, dtype=torch.uint8)
        for i in range(n):
            y, x = corners[i].tolist()
            images[i, :, y:y + side, x:x + side] = palette[self.targets[i]].view(3, 1, 1)
        self.images = images.to(torch.uint8)
        self.classes = [f"class{i}" for i in range(num_classes)]
        self.transform = transform



# --------------------------------------------------------------------------------------------- transforms


def train_transform(augment: bool, size: int) -> Callable | None:
    """Random crop (padding size/8, i.e. 4 at 32x32) + horizontal flip on uint8 tensors, or nothing."""
    if not augment:
        return None
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomCrop(size, padding=max(size // 8, 1)), v2.RandomHorizontalFlip()])


def _folder_transform(size: int, augment: bool) -> Callable:
    from torchvision.transforms import v2

    steps = [v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    extra = train_transform(augment, size)
    return v2.Compose(steps + ([extra] if extra is not None else []))


def _load_rgb(path: str):
    """The image at ``path`` as 8-bit RGB (torchvision's loader, but 16-bit grayscale is scaled down, where
    ``convert`` would clip it to white), with the file named when it cannot be read."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode.startswith("I;16"):
                image = image.point(lambda v: v * (1 / 256)).convert("L")
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds (and a library may patch Image.open)
        raise OSError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _class_folders(folder: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted: its subfolders but hidden ones (``.ipynb_checkpoints``,
    a ``.git``), which are no class."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_folder(root: Path, split: str, size: int, augment: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    class VisibleImageFolder(ImageFolder):
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = _class_folders(Path(directory))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

    folder = root / split
    if not folder.is_dir():
        raise DataNotFoundError(missing_data_message("imagefolder", str(root), f"{folder} is not a folder."))
    try:
        return VisibleImageFolder(str(folder), transform=_folder_transform(size, augment), loader=_load_rgb)
    except FileNotFoundError as exc:  # no class folders / no images
        raise DataNotFoundError(missing_data_message("imagefolder", str(root), f"{folder}: {exc}")) from None


# ---------------------------------------------------------------------------------------------- building


def _holds_image_folder(root: Path) -> bool:
    """Whether ``root/train`` or ``root/val`` holds a class folder (one split is enough: eval reads one)."""
    return any(split.is_dir() and _class_folders(split) for split in (root / "train", root / "val"))


def resolve_format(cfg: DataConfig) -> DataConfig:
    """``cfg`` with format ``auto`` replaced by the format of the folder ``cfg.root``: cifar10 where it holds
    CIFAR-10's python batches (``data_batch_N`` or ``test_batch``, in ``cifar-10-batches-py/`` or not),
    imagefolder where ``train/`` or ``val/`` holds class folders. Raises :class:`DataNotFoundError` (listing both
    layouts) when it holds neither, ValueError when it holds both; other formats are returned as they are."""
    if cfg.format != AUTO:
        return cfg
    if cfg.root is None:
        raise DataNotFoundError(missing_data_message(AUTO, None, "No dataset folder was given."))
    root = Path(cfg.root)
    found = [fmt for fmt, holds in (("cifar10", _holds_cifar10(cifar10_folder(root))),
                                    ("imagefolder", _holds_image_folder(root))) if holds]
    if not found:
        raise DataNotFoundError(missing_data_message(
            AUTO, cfg.root, f"--data-format auto: {root} holds neither CIFAR-10's batches nor an ImageFolder tree."))
    if len(found) > 1:
        raise ValueError(f"--data-format auto: {root} holds both CIFAR-10's batches and an ImageFolder tree "
                         f"(train/, val/); give --data-format cifar10 or imagefolder")
    return dataclasses.replace(cfg, format=found[0])


# per format: the mean and std the images are normalised with
NORMALISATION = {"synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
                 "imagefolder": (IMAGENET_MEAN, IMAGENET_STD)}


def build_datasets(cfg: DataConfig, augment: bool = False) -> DataBundle:
    """Both splits of the configured dataset (format ``auto`` resolved: :func:`resolve_format`); raises
    :class:`DataNotFoundError` when it is not there."""
    cfg = resolve_format(cfg)
    train, val = build_split(cfg, "train", augment), build_split(cfg, "val")
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"{cfg.root}: train/ and val/ have different class folders (only in train/: "
                         f"{only_train}; only in val/: {only_val})")
    mean, std = NORMALISATION[cfg.format]
    return DataBundle(train, val, list(train.classes), mean, std, cfg.size)


def build_split(cfg: DataConfig, split: str, augment: bool = False) -> Dataset:
    """One split ("train" or "val"; only the training split is ever augmented), with ``.classes``; raises
    :class:`DataNotFoundError` when it is not there. Only that split's files are read (format ``auto`` resolved
    first: :func:`resolve_format`)."""
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    cfg = resolve_format(cfg)
    size, train = cfg.size, split == "train"
    transform = train_transform(augment, size) if train else None
    if cfg.format == "synthetic":
        return SyntheticPatterns(cfg.synthetic_train if train else cfg.synthetic_val,
                                 seed=cfg.synthetic_seed + (0 if train else 1), transform=transform,
                                 num_classes=cfg.synthetic_classes, size=size)
    if cfg.root is None:
        raise DataNotFoundError(missing_data_message(cfg.format, None, "No dataset folder was given."))
    root = Path(cfg.root)
    if cfg.format == "cifar10":
        if size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; {cfg.image_size_origin} must be 32, got {size}")
        return CIFAR10Batches(root, train, transform)
    return _image_folder(root, split, size, augment and train)


def build_eval_dataset(cfg: DataConfig, split: str = "val") -> tuple[Dataset, list[str]]:
    """One split ("val" or "train") without augmentation, and its class names (the other split is not read)."""
    dataset = build_split(cfg, split)
    return dataset, list(dataset.classes)


def to_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             channels_last: bool = False) -> torch.Tensor:
    """uint8 [N, 3, H, W] (any device) -> normalised float32 on ``mean``'s device; mean/std: [1, 3, 1, 1]."""
    x = images.to(mean.device, non_blocking=True).float().div_(255.0).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def stats_tensors(mean: tuple[float, ...], std: tuple[float, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as [1, C, 1, 1] float32 tensors on ``device``."""
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))
    return mean_t, std_t
