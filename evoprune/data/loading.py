"""Finding and reading image data: :func:`load_images` recognises the form of a data path (see
:data:`ACCEPTED_FORMS`) and reads an ImageFolder tree, a tar archive of one (safely, without extracting), or a
torchvision CIFAR-10 folder (:func:`load_torchvision_cifar10`, which can also download it). Trees and archives are
checked for layout before any decoding, then decoded and cached by :mod:`evoprune.data.decoding`."""
from __future__ import annotations

import os
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..progress import bar, status
from .decoding import SPLITS, SplitFiles, cache_entry, decode_splits, default_cache_dir, read_cache
from .sets import ImageData, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

ACCEPTED_FORMS = (
    "The data path (--data) must be one of:\n"
    "  1. a directory in torchvision's CIFAR-10 layout: it holds cifar-10-batches-py/ (or is that folder);\n"
    "  2. an ImageFolder tree: train/<class>/<image> and val/<class>/<image>, the same class folders in both;\n"
    "  3. a .tar.gz, .tgz or .tar archive of such a tree.\n"
    "Form 1 can be downloaded into the path with download=True (CLI: --download), which needs network access."
)


def load_images(path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, download: bool = False,
                on_corrupt: str = "skip", workers: int | None = None, progress: bool = True) -> ImageData:
    """Load RGB image data as ``ImageData(train, val)``, uint8 tensors in memory.

    ``path`` is one of the :data:`ACCEPTED_FORMS`: an ImageFolder tree ``train/<class>/*`` + ``val/<class>/*``, a
    tar archive of one, or torchvision's CIFAR-10 folder (its train set becomes ``train`` and its test set ``val``;
    with ``download=True`` a path holding no data gets the torchvision CIFAR-10 download). Trees and archives are
    decoded with PIL (``workers`` processes; default: one per CPU for large sets) and cached under ``cache_dir``
    (default :func:`default_cache_dir`), keyed by the source path, sizes and modification times.

    The sets carry CIFAR-10's normalisation statistics; for other data, normalise with their own:
    ``load_images(path).with_train_stats()`` (see :class:`~evoprune.data.ChannelStats`).

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
    what = "does not exist" if not path.exists() else "holds no image data in a form evoprune reads"
    raise DataError(f"{path}: {what}.\n{ACCEPTED_FORMS}")


# ----------------------------------------------------------------------------------------------------------------
# Form 1: torchvision's CIFAR-10
# ----------------------------------------------------------------------------------------------------------------

def find_torchvision_root(path: Path) -> Path | None:
    """The torchvision ``root`` for ``path`` if it holds or is ``cifar-10-batches-py``, else None."""
    if (path / "cifar-10-batches-py").is_dir():
        return path
    if path.name == "cifar-10-batches-py" and path.is_dir():
        return path.parent
    return None


def load_torchvision_cifar10(root: str | os.PathLike, *, download: bool = False) -> ImageData:
    """Form 1: torchvision's pickled CIFAR-10 under ``root``; train -> ``train``, test -> ``val``.

    ``download=True`` fetches it into ``root`` first if it is not there (needs network access); a failed download
    or an incomplete folder raises :class:`DataError` listing the :data:`ACCEPTED_FORMS`.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root)
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
    return ImageData(train, val)


# ----------------------------------------------------------------------------------------------------------------
# Forms 2 and 3: an ImageFolder tree, or an archive of one
# ----------------------------------------------------------------------------------------------------------------

def load_image_folder(root: Path, *, cache_dir: Path, on_corrupt: str = "skip",
                      workers: int | None = None, progress: bool = True) -> ImageData:
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
            status(f"evoprune: loaded {cached.describe()} of {root} from the cache {entry}")
        return cached
    return decode_splits(splits, entry, on_corrupt=on_corrupt, workers=workers, progress=progress, source=root)


def load_image_archive(archive: Path, *, cache_dir: Path, on_corrupt: str = "skip",
                       workers: int | None = None, progress: bool = True) -> ImageData:
    """Form 3: a tar archive of an ImageFolder tree, read safely (:func:`read_archive`), decoded and cached.

    The cache key is the archive's resolved path, size and modification time.
    """
    archive = Path(archive)
    stat = archive.stat()
    entry = cache_entry(cache_dir, archive, [stat.st_size, stat.st_mtime_ns])
    cached = read_cache(entry, on_corrupt)
    if cached is not None:
        if progress:
            status(f"evoprune: loaded {cached.describe()} of {archive} from the cache {entry}")
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
