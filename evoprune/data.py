"""CIFAR-10 and other small RGB image sets, held in memory as uint8 tensors.

:func:`load_cifar10` accepts three forms of data (see :data:`ACCEPTED_FORMS`): torchvision's pickled CIFAR-10
folder, an ImageFolder tree ``train/<class>/*`` + ``val/<class>/*``, or a tar archive of such a tree. Decoded images
are cached as one ``.pt`` file per split, so only the first load pays for decoding.

Augmentation (:func:`augment`) and normalisation (:func:`normalize`) work on whole batches of tensors, on any device,
and :func:`batches` ties them together into a training or evaluation iterator.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import tarfile
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .errors import ConfigError, DataError
from .models import CIFAR10_MEAN, CIFAR10_STD
from .progress import bar, status
from .storage import torch_save

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "val")
CACHE_VERSION = 1
#: Below this many files a process pool costs more than it saves.
POOL_MIN_FILES = 2048
#: Images decoded per task (and per progress bar update).
DECODE_CHUNK = 256

ACCEPTED_FORMS = (
    "The data path (--data) must be one of:\n"
    "  1. a directory in torchvision's CIFAR-10 layout: it holds cifar-10-batches-py/ (or is that folder);\n"
    "  2. an ImageFolder tree: train/<class>/<image> and val/<class>/<image>, the same class folders in both;\n"
    "  3. a .tar.gz, .tgz or .tar archive of such a tree.\n"
    "Form 1 can be downloaded into the path with download=True (CLI: --download), which needs network access."
)


# ----------------------------------------------------------------------------------------------------------------
# The in-memory image set
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images as a uint8 tensor ``N x 3 x H x W``, int64 labels ``N`` and the class names labels index into."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"ImageSet images must be a uint8 N x C x H x W tensor, not {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"ImageSet labels must be an int64 tensor of length {self.images.shape[0]}, not "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"ImageSet({len(self)} images {tuple(self.images.shape[1:])}, "
                f"{len(self.classes)} classes)")

    def subset(self, index) -> "ImageSet":
        """The images at ``index`` (a tensor, array, list of ints or a boolean mask), as a new set."""
        index = torch.as_tensor(index)
        if index.dtype != torch.bool:
            index = index.long()
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def fingerprint(self) -> str:
        """A short digest of the labels and a sample of the pixels: which data a cached result came from."""
        h = hashlib.sha1(self.labels.numpy().tobytes())
        h.update(self.images.reshape(-1)[:: 997].numpy().tobytes())
        h.update(str(tuple(self.images.shape)).encode())
        return h.hexdigest()[:10]

    def class_counts(self) -> torch.Tensor:
        """Number of images of each class, indexed like :attr:`classes`."""
        return torch.bincount(self.labels, minlength=len(self.classes))

    def stratified_split(self, size: float | int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Split into ``(a, b)`` with the class proportions of the whole set kept in both parts.

        ``size`` is the share of images that go to ``a``: a float in (0, 1) or an int count in [1, len - 1]. Each
        class's images are permuted with ``seed`` and the first ones go to ``a``; the per-class counts are rounded by
        largest remainder so that ``len(a)`` is exact. Both parts keep the original order of their images.
        """
        in_a = self._stratified_mask(self._split_count(size), seed)
        return self.subset(in_a), self.subset(~in_a)

    def stratified_sample(self, n: int, seed: int = 0) -> "ImageSet":
        """``n`` images drawn without replacement, class-stratified and seeded; ``n == len`` returns a copy."""
        if isinstance(n, int) and n == len(self):
            return self.subset(torch.arange(len(self)))
        return self.stratified_split(n, seed)[0]

    def _split_count(self, size: float | int) -> int:
        total = len(self)
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ConfigError(f"split size must be a fraction in (0, 1) or an image count, not {size!r}")
        if isinstance(size, float):
            if not 0.0 < size < 1.0:
                raise ConfigError(f"split fraction must be in (0, 1), not {size}")
            size = round(size * total)
        if not 0 < size < total:
            raise ConfigError(f"cannot split {total} images into parts of {size} and {total - size}: "
                              "both parts need at least one image")
        return size

    def _stratified_mask(self, count: int, seed: int) -> torch.Tensor:
        counts = self.class_counts()
        share = counts.double() * count / len(self)
        take = share.floor().long()
        remainder_order = torch.argsort(share - take, descending=True, stable=True)
        take[remainder_order[: count - int(take.sum())]] += 1
        generator = torch.Generator().manual_seed(seed)
        mask = torch.zeros(len(self), dtype=torch.bool)
        for label in range(len(self.classes)):
            members = torch.nonzero(self.labels == label).flatten()
            chosen = members[torch.randperm(len(members), generator=generator)[: int(take[label])]]
            mask[chosen] = True
        return mask


class Cifar10(NamedTuple):
    """The ``(train, val)`` pair returned by :func:`load_cifar10`; unpacks like a tuple."""

    train: ImageSet
    val: ImageSet


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$EVOPRUNE_CACHE`` if set, else ``~/.cache/evoprune``."""
    return Path(os.environ.get("EVOPRUNE_CACHE") or Path.home() / ".cache" / "evoprune")


def load_cifar10(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, download: bool = False,
                 on_corrupt: str = "skip", workers: int | None = None, progress: bool = True) -> Cifar10:
    """Load CIFAR-10 (or any RGB ImageFolder data) as ``Cifar10(train, val)``, uint8 tensors in memory.

    ``path`` is one of the :data:`ACCEPTED_FORMS`. For form 1, torchvision's train set becomes ``train`` and its
    test set ``val``; with ``download=True`` a path holding no data gets the torchvision download. Forms 2 and 3 are
    decoded with PIL (``workers`` processes; default: one per CPU for large sets) and cached under ``cache_dir``
    (default :func:`default_cache_dir`), keyed by the source path, sizes and modification times.

    Unreadable images are skipped with a warning that counts them (``on_corrupt="skip"``) or raise a
    :class:`~evoprune.errors.DataError` naming the file (``on_corrupt="error"``). Layout problems (missing path,
    empty split, class folders that differ between train and val, unsafe archive members) raise ``DataError``
    before any decoding.

    With ``progress`` (the default), reading an archive and decoding show bars on stderr (only when stderr is a
    terminal, see :mod:`evoprune.progress`), and plain status lines on stderr say what is decoded, where the cache
    was written, or that it was loaded. ``progress=False`` prints nothing.
    """
    if on_corrupt not in ("skip", "error"):
        raise ConfigError(f"on_corrupt must be 'skip' or 'error', not {on_corrupt!r}")
    path = Path(path).expanduser()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIXES):
        return load_image_archive(path, cache_dir=cache_dir, on_corrupt=on_corrupt, workers=workers,
                                  progress=progress)
    if path.is_dir() and all((path / split).is_dir() for split in SPLITS):
        return load_image_folder(path, cache_dir=cache_dir, on_corrupt=on_corrupt, workers=workers,
                                 progress=progress)
    torchvision_root = find_torchvision_root(path)
    if torchvision_root is not None:
        return load_torchvision_cifar10(torchvision_root)
    if download and not path.is_file():
        return load_torchvision_cifar10(path, download=True)
    what = "does not exist" if not path.exists() else "holds no CIFAR-10 data in a form evoprune reads"
    raise DataError(f"{path}: {what}.\n{ACCEPTED_FORMS}")


def find_torchvision_root(path: Path) -> Path | None:
    """The torchvision ``root`` for ``path`` if it holds or is ``cifar-10-batches-py``, else None."""
    if (path / "cifar-10-batches-py").is_dir():
        return path
    if path.name == "cifar-10-batches-py" and path.is_dir():
        return path.parent
    return None


def load_torchvision_cifar10(root: Path, *, download: bool = False) -> Cifar10:
    """Form 1: torchvision's pickled CIFAR-10 under ``root``; train -> ``train``, test -> ``val``."""
    from torchvision.datasets import CIFAR10

    try:
        parts = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; bad checksums are RuntimeErrors
        action = "could not be downloaded" if download else "is not a complete torchvision CIFAR-10 folder"
        raise DataError(f"{root}: CIFAR-10 {action} ({type(exc).__name__}: {exc}).\n{ACCEPTED_FORMS}") from exc
    train, val = (
        ImageSet(torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))),
                 torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes))
        for ds in parts
    )
    return Cifar10(train, val)


class SplitFiles(NamedTuple):
    """One split of an ImageFolder tree: display names, sources (a path, or the bytes of an archive member),
    labels, and the class names the labels index into."""

    names: list[str]
    sources: list
    labels: list[int]
    classes: list[str]


def load_image_folder(root: Path, *, cache_dir: Path, on_corrupt: str = "skip",
                      workers: int | None = None, progress: bool = True) -> Cifar10:
    """Form 2: an ImageFolder tree ``root/train/<class>/*`` and ``root/val/<class>/*``, cached after decoding.

    The cache key covers the relative path, size and modification time of every image file.
    """
    root = Path(root)
    splits = index_tree(scan_folder(root), root)
    fingerprint = []
    for split in SPLITS:
        for source in splits[split].sources:
            stat = source.stat()
            fingerprint.append((str(source.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    entry = cache_entry(cache_dir, root, fingerprint)
    cached = read_cache(entry, on_corrupt)
    if cached is not None:
        if progress:
            status(f"evoprune: loaded {describe(cached)} of {root} from the cache {entry}")
        return cached
    return decode_splits(splits, entry, on_corrupt=on_corrupt, workers=workers, progress=progress, source=root)


def load_image_archive(archive: Path, *, cache_dir: Path, on_corrupt: str = "skip",
                       workers: int | None = None, progress: bool = True) -> Cifar10:
    """Form 3: a tar archive of an ImageFolder tree, read safely (:func:`read_archive`), decoded and cached.

    The cache key is the archive's resolved path, size and modification time.
    """
    archive = Path(archive)
    stat = archive.stat()
    entry = cache_entry(cache_dir, archive, [stat.st_size, stat.st_mtime_ns])
    cached = read_cache(entry, on_corrupt)
    if cached is not None:
        if progress:
            status(f"evoprune: loaded {describe(cached)} of {archive} from the cache {entry}")
        return cached
    if progress:
        status(f"evoprune: reading {archive} ({stat.st_size / 2**20:.1f} MiB)")
    splits = index_tree(read_archive(archive, progress=progress), archive)
    return decode_splits(splits, entry, on_corrupt=on_corrupt, workers=workers, progress=progress, source=archive)


#: ``{split: {class name: [(display name, source), ...]}}``, the raw content of an ImageFolder tree.
Tree = dict


def scan_folder(root: Path) -> Tree:
    """The image files of ``root/train`` and ``root/val`` (one level below each class folder; hidden ones skipped)."""
    tree: Tree = {}
    for split in SPLITS:
        tree[split] = {}
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.is_dir() and not class_dir.name.startswith("."):
                tree[split][class_dir.name] = [
                    (str(p), p) for p in sorted(class_dir.iterdir())
                    if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
                ]
    return tree


def read_archive(archive: Path, *, progress: bool = False) -> Tree:
    """The image files of a tar archive's ``train/`` and ``val/`` trees, read into memory.

    Nothing is extracted to disk, and every member name is checked anyway: an absolute path or a ``..`` component
    makes the archive be refused with :class:`DataError`, since it can only come from a broken or hostile archive.
    The tree may sit at the top of the archive or inside one top-level folder. With ``progress`` a bar over the
    archive's bytes is drawn on stderr (when it is a terminal).
    """
    files: dict[tuple[str, ...], bytes] = {}
    folders: set[tuple[str, ...]] = set()
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar, \
                bar(total=os.fstat(raw.fileno()).st_size, desc="reading archive", unit="B", unit_scale=True,
                    unit_divisor=1024, enabled=progress) as shown:
            for member in tar:
                parts = checked_member_parts(archive, member.name)
                if member.isdir():
                    folders.add(parts)
                elif member.isfile() and PurePosixPath(member.name).suffix.lower() in IMAGE_EXTENSIONS:
                    files[parts] = tar.extractfile(member).read()
                shown.update(raw.tell() - shown.n)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot be read as a tar archive ({type(exc).__name__}: {exc})") from exc
    folders |= {parts[:-1] for parts in files}
    prefix = archive_tree_prefix(archive, folders)
    depth = len(prefix)

    def split_of(parts: tuple[str, ...], length: int) -> str | None:
        """The split ``parts`` belongs to, if it is ``prefix/<split>/...`` of ``length`` components, not hidden."""
        if len(parts) == depth + length and parts[:depth] == prefix and parts[depth] in SPLITS \
                and not parts[-1].startswith("."):
            return parts[depth]
        return None

    tree: Tree = {split: {} for split in SPLITS}
    for parts in sorted(folders):  # prefix/<split>/<class>
        if split_of(parts, 2):
            tree[parts[depth]][parts[-1]] = []
    for parts in sorted(files):  # prefix/<split>/<class>/<image>
        split = split_of(parts, 3)
        if split and parts[-2] in tree[split]:
            tree[split][parts[-2]].append((f"{archive}:{'/'.join(parts)}", files[parts]))
    return tree


def checked_member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of a tar member name, or :class:`DataError` if it is absolute or climbs with ``..``."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{archive}: unsafe member {name!r} (absolute path or '..'); refusing to read the archive.")
    return tuple(part for part in pure.parts if part != ".")


def archive_tree_prefix(archive: Path, folders: set[tuple[str, ...]]) -> tuple[str, ...]:
    """Where ``train/`` and ``val/`` sit in an archive: at the top (``()``) or in one top-level folder."""
    if all(any(f[:1] == (split,) for f in folders) for split in SPLITS):
        return ()
    for top in sorted({f[0] for f in folders if f}):
        if all(any(f[:2] == (top, split) for f in folders) for split in SPLITS):
            return (top,)
    raise DataError(f"{archive}: has no train/ and val/ folders at its top level or one level down.\n"
                    f"{ACCEPTED_FORMS}")


def index_tree(tree: Tree, where: Path) -> dict[str, SplitFiles]:
    """Label a tree by train's sorted class names, checking the layout first.

    Raises :class:`DataError` for an empty split, a class folder without images, or val class folders that differ
    from train's ("unknown classes" in val, or classes val lacks).
    """
    classes = sorted(tree["train"])
    if not classes:
        raise DataError(f"{where}: empty split train/, it has no class folders.\n{ACCEPTED_FORMS}")
    unknown = sorted(set(tree["val"]) - set(classes))
    if unknown:
        raise DataError(f"{where}: unknown classes {unknown} in val/: they are not class folders of train/ "
                        f"({', '.join(classes)}). Train and val must have the same class folders.")
    missing = sorted(set(classes) - set(tree["val"]))
    if missing:
        raise DataError(f"{where}: val/ lacks the class folders {missing} that train/ has. "
                        "Train and val must have the same class folders.")
    splits = {}
    for split in SPLITS:
        names, sources, labels = [], [], []
        for label, name in enumerate(classes):
            entries = tree[split][name]
            if not entries:
                raise DataError(f"{where}: class folder {split}/{name} holds no images "
                                f"(looked for {', '.join(IMAGE_EXTENSIONS)}).")
            names += [display for display, _ in entries]
            sources += [source for _, source in entries]
            labels += [label] * len(entries)
        splits[split] = SplitFiles(names, sources, labels, classes)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Decoding and the cache
# ----------------------------------------------------------------------------------------------------------------

def decode_images(sources: Sequence, *, workers: int | None = None, progress: bool = False,
                  desc: str = "decoding") -> list[np.ndarray | str]:
    """Decode images (paths or encoded bytes) to ``H x W x 3`` uint8 arrays, in order.

    An unreadable image gives its error message instead of an array. ``workers`` processes share the work
    (default: one per CPU when there are at least :data:`POOL_MIN_FILES` images, else this process alone).
    With ``progress`` a bar counting the images (labelled ``desc``) is drawn on stderr when it is a terminal.
    """
    sources = [str(s) if isinstance(s, os.PathLike) else s for s in sources]
    if workers is None:
        workers = (os.cpu_count() or 1) if len(sources) >= POOL_MIN_FILES else 1
    pooled = workers > 1 and len(sources) >= 2
    size = max(1, min(DECODE_CHUNK, -(-len(sources) // (workers * 4)) if pooled else DECODE_CHUNK))
    chunks = [sources[i:i + size] for i in range(0, len(sources), size)]
    if not pooled:
        return collect_decoded(map(decode_chunk, chunks), len(sources), progress=progress, desc=desc)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        # map submits every chunk at once, so the workers are forked before the bar is created
        parts = pool.map(decode_chunk, chunks)
        return collect_decoded(parts, len(sources), progress=progress, desc=desc)


def collect_decoded(parts, total: int, *, progress: bool, desc: str) -> list[np.ndarray | str]:
    """Concatenate the decoded chunks ``parts`` as they arrive, advancing a bar of ``total`` images."""
    results: list[np.ndarray | str] = []
    with bar(total=total, desc=desc, unit="img", enabled=progress) as shown:
        for part in parts:
            results += part
            shown.update(len(part))
    return results


def decode_chunk(sources: Sequence) -> list[np.ndarray | str]:
    """Decode each image with PIL and convert it to RGB (the body of :func:`decode_images`, run in each worker)."""
    from PIL import Image

    results: list[np.ndarray | str] = []
    for source in sources:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                results.append(np.asarray(image.convert("RGB")))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def decode_split(split: str, files: SplitFiles, *, on_corrupt: str, workers: int | None,
                 progress: bool = False) -> tuple[ImageSet, list[str]]:
    """Decode one split into an :class:`ImageSet`; also return the names of the files skipped as unreadable."""
    decoded = decode_images(files.sources, workers=workers, progress=progress, desc=f"decoding {split}")
    kept, labels, skipped = [], [], []
    for name, label, result in zip(files.names, files.labels, decoded):
        if isinstance(result, str):
            if on_corrupt == "error":
                raise DataError(f"{name}: cannot be decoded as an image ({result}). Remove or replace it, or "
                                "pass on_corrupt='skip' to skip unreadable images.")
            skipped.append(name)
            continue
        if kept and result.shape != kept[0].shape:
            raise DataError(f"{name}: image is {result.shape[1]}x{result.shape[0]}, but the images before it in "
                            f"{split}/ are {kept[0].shape[1]}x{kept[0].shape[0]}. All images of a split must have "
                            "the same size; resize them first.")
        kept.append(result)
        labels.append(label)
    if not kept:
        raise DataError(f"{split}: empty split, none of its {len(files.names)} image files could be decoded.")
    images = torch.from_numpy(np.stack(kept)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), files.classes), skipped


def decode_splits(splits: dict[str, SplitFiles], entry: Path, *, on_corrupt: str, workers: int | None,
                  progress: bool = False, source: Path | None = None) -> Cifar10:
    """Decode train and val, warn about skipped files, and cache both under ``entry``.

    With ``progress``, a status line on stderr announces the decoding (of ``source``), bars count the images, and
    a last status line says where the result was cached (or that it could not be).
    """
    start = time.perf_counter()
    if progress:
        counts = ", ".join(f"{len(splits[split].names)} {split}" for split in SPLITS)
        status(f"evoprune: decoding {sum(len(f.names) for f in splits.values())} images ({counts}) of "
               f"{source or entry.name}; done once, then read from the cache")
    decoded = {split: decode_split(split, splits[split], on_corrupt=on_corrupt, workers=workers, progress=progress)
               for split in SPLITS}
    cached = True
    for split, (imageset, skipped) in decoded.items():
        warn_skipped(split, skipped)
        cached = write_cache(entry / f"{split}.pt", imageset, skipped) and cached
    result = Cifar10(decoded["train"][0], decoded["val"][0])
    if progress:
        skipped = sum(len(s) for _, s in decoded.values())
        status(f"evoprune: decoded {describe(result)} in {time.perf_counter() - start:.1f}s"
               + (f", skipped {skipped} unreadable" if skipped else "")
               + (f"; cached in {entry}" if cached else "; not cached"))
    return result


def describe(data: Cifar10) -> str:
    """``50000 train + 10000 val images (3x32x32, 10 classes)``."""
    shape = "x".join(str(d) for d in data.train.images.shape[1:])
    return (f"{len(data.train)} train + {len(data.val)} val images ({shape}, "
            f"{len(data.train.classes)} classes)")


def warn_skipped(split: str, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {split}/, e.g. {skipped[0]}", stacklevel=4)


def cache_entry(cache_dir: Path, source: Path, fingerprint) -> Path:
    """The cache folder for ``source``: its name plus a hash of its resolved path and ``fingerprint``."""
    digest = hashlib.sha256(repr((CACHE_VERSION, str(source.resolve()), fingerprint)).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name) or "data"
    return Path(cache_dir) / f"{stem}-{digest}"


def write_cache(path: Path, imageset: ImageSet, skipped: list[str]) -> bool:
    """Save a decoded split atomically; a cache that cannot be written only costs a warning (and returns False)."""
    payload = {"version": CACHE_VERSION, "images": imageset.images, "labels": imageset.labels,
               "classes": imageset.classes, "skipped": skipped}
    try:
        torch_save(payload, path)
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path} ({exc}); the next load will decode again",
                      stacklevel=4)
        return False
    return True


def read_cache(entry: Path, on_corrupt: str) -> Cifar10 | None:
    """Both splits from the cache folder ``entry``, or None if either is missing or unreadable.

    Files skipped when the cache was built are warned about again, or raise with ``on_corrupt="error"``.
    """
    sets = {}
    for split in SPLITS:
        try:
            payload = torch.load(entry / f"{split}.pt", map_location="cpu", weights_only=True)
            if payload.get("version") != CACHE_VERSION:
                return None
            sets[split] = ImageSet(payload["images"], payload["labels"], payload["classes"])
            skipped = list(payload["skipped"])
        except (OSError, RuntimeError, KeyError, AttributeError, TypeError, DataError, EOFError, ValueError):
            return None
        if skipped and on_corrupt == "error":
            raise DataError(f"{skipped[0]}: cannot be decoded as an image (found when the cache {entry} was built). "
                            "Remove or replace it, or pass on_corrupt='skip' to skip unreadable images.")
        warn_skipped(split, skipped)
    return Cifar10(sets["train"], sets["val"])


# ----------------------------------------------------------------------------------------------------------------
# Batches, augmentation, normalisation
# ----------------------------------------------------------------------------------------------------------------

def augment(batch: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4) -> torch.Tensor:
    """Random crop with ``padding``-pixel reflect padding, then random horizontal flip, for a whole batch at once.

    ``batch`` is ``N x C x H x W`` of any dtype (uint8 or float) on any device; the result has the same shape, dtype
    and device. Each image gets its own offsets and flip, drawn from ``generator`` (a CPU generator). The padding is
    never materialised: each output pixel is gathered from its reflected source position.
    """
    if batch.dim() != 4:
        raise DataError(f"augment expects an N x C x H x W batch, not shape {tuple(batch.shape)}")
    n, c, h, w = batch.shape
    if not 0 <= padding < min(h, w):
        raise ConfigError(f"reflect padding must be in [0, {min(h, w) - 1}] for {h}x{w} images, not {padding}")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = reflect_index(h, padding)[offsets[0, :, None] + torch.arange(h)]            # n x h
    cols = reflect_index(w, padding)[offsets[1, :, None] + torch.arange(w)]            # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    source = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).to(batch.device)
    return batch.reshape(n, c, h * w).gather(2, source.expand(n, c, h * w)).reshape(n, c, h, w)


def reflect_index(size: int, padding: int) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis: ``[p, ..., 1, 0, 1, ..., size-1, size-2, ...]``."""
    position = torch.arange(-padding, size + padding).abs()
    return torch.where(position >= size, 2 * (size - 1) - position, position)


_augment = augment  # `batches` has a flag of the same name


def normalize(batch: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """uint8 ``N x C x H x W`` in [0, 255] -> float32 ``(x / 255 - mean) / std`` per channel, on the batch's device."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.to(torch.float32) / 255.0 - mean_t) / std_t


def batches(imageset: ImageSet, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
            augment: bool = False, device: str | torch.device = "cpu", drop_last: bool = False,
            mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)``: normalised float32 images and int64 labels on ``device``.

    ``shuffle`` draws a fresh order from ``generator`` each call; ``augment`` applies :func:`augment` (on ``device``,
    to the uint8 images before normalising). ``drop_last`` drops a final batch smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    total = len(imageset)
    order = torch.randperm(total, generator=generator) if shuffle else None
    stop = total - total % batch_size if drop_last else total
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        images = imageset.images[index].to(device, non_blocking=True)
        labels = imageset.labels[index].to(device, non_blocking=True)
        if augment:
            images = _augment(images, generator)
        yield normalize(images, mean, std), labels


def num_batches(imageset: ImageSet, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields."""
    return len(imageset) // batch_size if drop_last else -(-len(imageset) // batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Generated data for the built-in demo and the tests (no download)

def synthetic(n_train: int = 2000, n_val: int = 1000, *, classes: int = 4, size: int = 16, noise: float = 0.35,
              seed: int = 0) -> Cifar10:
    """A small generated image classification task: each class is a fixed random smooth colour pattern; a sample is
    its class pattern, randomly shifted by up to 2 pixels and contrast-jittered, plus pixel noise. ``noise`` sets
    how hard it is. It uses the same uint8 layout (and, loosely, the statistics) of CIFAR-10."""
    if classes < 2 or size < 8 or n_train < classes or n_val < classes:
        raise ConfigError("synthetic data need >= 2 classes, size >= 8 and at least one image per class per split")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n):
        labels = torch.arange(n) % classes
        labels = labels[torch.randperm(n, generator=gen)]
        shifts = torch.randint(-2, 3, (n, 2), generator=gen)
        base = templates[labels]
        images = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(base, shifts)])
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
        images = 0.5 + contrast * (images - 0.5) + noise * torch.randn(images.shape, generator=gen)
        return ImageSet((images.clamp(0, 1) * 255).round().to(torch.uint8), labels.long(),
                        [f"class{c}" for c in range(classes)])

    return Cifar10(draw(n_train), draw(n_val))
