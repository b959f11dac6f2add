"""Datasets as in-memory uint8 tensors, and vectorised batch augmentation.

Every loader returns a `Split` pair (train, test): images (N, C, H, W) uint8 and labels
(N,) int64, with the class names. The whole set sits in memory (Fashion-MNIST 47 MB,
CIFAR-10 180 MB), so batches are index slices and augmentation is a few tensor ops; training
on a GPU moves the whole training split there once and draws and augments every batch there.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")

# per-channel mean and std of the training sets, used for normalisation
NORMALIZATION = {
    "fashion-mnist": ([0.2860], [0.3530]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def normalization(self) -> tuple[list[float], list[float]]:
        if self.name in NORMALIZATION:
            return NORMALIZATION[self.name]
        x = self.train.images[:10000].float().div(255)
        return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3)).tolist()


class DatasetMissing(FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(data_dir: str | None = None, download: bool = False) -> Dataset:
    """The four IDX files from `data_dir`, else the Debian package's folder, else (only with
    download=True) torchvision's download."""
    candidates = [Path(data_dir)] if data_dir else []
    candidates += [FASHION_MNIST_DIR, Path("data/FashionMNIST/raw")]
    for d in candidates:
        files = {k: d / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
                 for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
        if all(p.exists() for p in files.values()):
            return Dataset("fashion-mnist",
                           Split(torch.from_numpy(_read_idx(files["train-images"]).copy()).unsqueeze(1),
                                 torch.from_numpy(_read_idx(files["train-labels"]).astype(np.int64))),
                           Split(torch.from_numpy(_read_idx(files["t10k-images"]).copy()).unsqueeze(1),
                                 torch.from_numpy(_read_idx(files["t10k-labels"]).astype(np.int64))),
                           list(FASHION_MNIST_CLASSES))
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST("data", train=True, download=True)
        FashionMNIST("data", train=False, download=True)
        return load_fashion_mnist("data/FashionMNIST/raw")
    raise DatasetMissing(
        f"Fashion-MNIST not found in {[str(c) for c in candidates]}. Install it with "
        "`apt-get update && apt-get install -y dataset-fashion-mnist`, pass --data-dir, "
        "or pass --download to fetch it with torchvision.")


CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def _read_cifar_bin(path: Path) -> Split:
    """A CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    images = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy())
    return Split(images, torch.from_numpy(raw[:, 0].astype(np.int64)))


def load_cifar10(data_dir: str | None = None, download: bool = False) -> Dataset:
    """CIFAR-10's binary version (cifar-10-batches-bin: plain bytes, no pickle) from
    `data_dir` (default ./data), downloading it only when asked."""
    root = Path(data_dir or "data")
    folder = root if (root / "test_batch.bin").exists() else root / "cifar-10-batches-bin"
    if not (folder / "test_batch.bin").exists() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_BINARY_URL, str(root), md5=CIFAR10_BINARY_MD5)
        folder = root / "cifar-10-batches-bin"
    files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)] + [folder / "test_batch.bin"]
    if not all(f.exists() for f in files):
        raise DatasetMissing(
            f"CIFAR-10 binary batches not found under {str(root)!r}. Pass --download to fetch them, or use "
            "--data-dir <folder or .zip of train/<class>/ and test/<class>/ images>.")
    parts = [_read_cifar_bin(f) for f in files[:5]]
    train = Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))
    classes = (folder / "batches.meta.txt").read_text().split() if (folder / "batches.meta.txt").exists() else \
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Dataset("cifar10", train, _read_cifar_bin(files[5]), classes)


def load_imagefolder(path: str, name: str | None = None) -> Dataset:
    """A folder or .zip holding train/<class>/* and test/<class>/* images."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise DatasetMissing(f"image folder {path!r} does not exist; expected a folder or .zip with "
                             "train/<class>/ and test/<class>/ sub-folders")
    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}  # split -> (class, member)
    if p.suffix == ".zip":
        zf = zipfile.ZipFile(p)
        names = zf.namelist()
        read = zf.read
    else:
        names = [str(f.relative_to(p)) for f in p.rglob("*") if f.is_file()]
        read = lambda n: (p / n).read_bytes()  # noqa: E731
    for n in names:
        parts = n.split("/")
        if len(parts) >= 3 and parts[-3] in entries and n.lower().endswith(IMAGE_SUFFIXES):
            # folder names are class names, percent-decoded ("T-shirt%2Ftop": the feedback export)
            entries[parts[-3]].append((urllib.parse.unquote(parts[-2]), n))
    if not entries["train"] or not entries["test"]:
        raise DatasetMissing(f"{path!r} holds no train/<class>/ and test/<class>/ images")
    classes = sorted({c for c, _ in entries["train"]})
    index = {c: i for i, c in enumerate(classes)}

    def split(items: list[tuple[str, str]]) -> Split:
        items = sorted(items)
        first = np.asarray(Image.open(io.BytesIO(read(items[0][1]))))
        mode = "L" if first.ndim == 2 else "RGB"
        arr = np.stack([np.asarray(Image.open(io.BytesIO(read(n))).convert(mode)) for _, n in items])
        x = torch.from_numpy(arr)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return Split(x.contiguous(), torch.tensor([index[c] for c, _ in items]))

    stem = name or ("cifar10" if classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"] else p.stem)
    return Dataset(stem, split(entries["train"]), split(entries["test"]), classes)


DATASETS = ("fashion-mnist", "cifar10", "imagefolder")


def load_dataset(name: str, data_dir: str | None = None, download: bool = False) -> Dataset:
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name == "cifar10":
        if data_dir and (data_dir.endswith(".zip") or os.path.isdir(os.path.join(data_dir, "train"))):
            return load_imagefolder(data_dir, "cifar10")
        return load_cifar10(data_dir, download)
    if name == "imagefolder":
        if not data_dir:
            raise DatasetMissing("--dataset imagefolder needs --data-dir <folder or .zip>")
        return load_imagefolder(data_dir)
    raise ValueError(f"unknown dataset {name!r}; valid choices: {list(DATASETS)}")


def keep_classes(ds: Dataset, exclude: list[str]) -> Dataset:
    """The dataset without the named classes, remaining labels renumbered in order."""
    unknown = [c for c in exclude if c not in ds.classes]
    if unknown:
        raise ValueError(f"--exclude-classes: unknown {unknown}; classes are {ds.classes}")
    kept = [c for c in ds.classes if c not in exclude]
    remap = torch.full((len(ds.classes),), -1, dtype=torch.int64)
    for i, c in enumerate(kept):
        remap[ds.classes.index(c)] = i

    def split(s: Split) -> Split:
        new = remap[s.labels]
        keep = new >= 0
        return Split(s.images[keep], new[keep])
    return Dataset(ds.name, split(ds.train), split(ds.test), kept)


def fold_in(ds: Dataset, images: torch.Tensor, names: list[str]) -> tuple[Dataset, Split]:
    """Examples taught by users as extra training data: (the data set with any new class
    names appended, the examples as a Split in its label space). A name matches an existing
    class when they differ only in case (the service's rule)."""
    classes = list(ds.classes)
    index = {c.casefold(): i for i, c in enumerate(classes)}
    labels = []
    for n in names:
        if n.casefold() not in index:
            index[n.casefold()] = len(classes)
            classes.append(n)
        labels.append(index[n.casefold()])
    if images.shape[1:] != ds.train.images.shape[1:]:
        raise ValueError(f"taught examples are {tuple(images.shape[1:])}, the data set {tuple(ds.train.images.shape[1:])}")
    return Dataset(ds.name, ds.train, ds.test, classes), Split(images, torch.tensor(labels, dtype=torch.int64))


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` indices drawn without replacement, seeded, with every class in proportion to its
    share of `labels` (largest remainders get the leftover places); sorted. Data sets stored
    class by class (the CIFAR-10 zip) get every class, not the first one."""
    N = len(labels)
    if n >= N:
        return torch.arange(N)
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n / N
    take = exact.floor().long()
    short = n - int(take.sum())
    take[(exact - take).argsort(descending=True)[:short]] += 1  # largest remainders
    picked = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def subset(split: Split, indices: torch.Tensor) -> Split:
    return Split(split.images[indices], split.labels[indices])


def carve_validation(train: Split, size: int, seed: int) -> tuple[Split, Split, torch.Tensor]:
    """(train without the validation images, validation, validation indices into `train`):
    a seeded class-stratified split, reproducible from (size, seed) and the data set."""
    val_idx = stratified_indices(train.labels, size, seed) if size > 0 else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(len(train.labels), dtype=torch.bool)
    keep[val_idx] = False
    return subset(train, keep.nonzero().squeeze(1)), subset(train, val_idx), val_idx


def validation_of(ds: Dataset, record: dict) -> Split:
    """The validation split a model was trained beside, rebuilt from its manifest's "data"
    record (data set, excluded classes, size, seed) and checked against the recorded hash of
    its indices, so a benchmark chooses settings on exactly the images training held out."""
    if not record.get("validation_size"):
        raise ValueError("this model was trained without a validation split (manifest data.validation_size)")
    if record.get("exclude_classes"):
        ds = keep_classes(ds, record["exclude_classes"])
    _, val, idx = carve_validation(ds.train, record["validation_size"], record["validation_seed"])
    if hashlib.sha256(idx.numpy().tobytes()).hexdigest() != record["validation_indices_sha256"]:
        raise ValueError("the rebuilt validation split differs from the one recorded in the manifest "
                         "(another copy of the data set?)")
    return val


def normalize(images: torch.Tensor, mean: list[float] | torch.Tensor, std: list[float] | torch.Tensor
              ) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel, on the images' device.
    `mean`, `std` per channel: lists, or (C,) float32 tensors already there (a training step:
    no copy from the host)."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None, *,
            flips: torch.Tensor | None = None, reflect: bool = False) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill, or the image reflected) and
    horizontal flips, per sample, as one gather: (B, C, H, W) -> (B, C, H, W). The flips are
    drawn at random, or given ((B,) bool `flips`: the recipe's alternating flips). Runs where
    the images are, drawing from `generator` (on that device too): a batch on a GPU is
    augmented there."""
    B, C, H, W = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect" if reflect and pad else "constant")
    dy = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (B, 1), generator=generator, device=dev)
    rows = dy + torch.arange(H, device=dev)  # (B, H)
    cols = dx + torch.arange(W, device=dev)  # (B, W)
    if flip:
        flipped = (torch.rand(B, generator=generator, device=dev) < 0.5) if flips is None else flips  # (B,)
        cols = torch.where(flipped.view(B, 1), cols.flip(1), cols)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    out = padded.permute(0, 2, 3, 1)[b, rows.unsqueeze(2), cols.unsqueeze(1)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
