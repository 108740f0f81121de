"""Decoding image files (paths or archive bytes) into :class:`~evoprune.data.ImageSet` splits with PIL, in a process
pool for large sets, and the on-disk cache of decoded splits (one ``.pt`` file per split)."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..progress import bar, status
from ..storage import torch_save
from .sets import ImageData, ImageSet

SPLITS = ("train", "val")
CACHE_VERSION = 1
#: Below this many files a process pool costs more than it saves.
POOL_MIN_FILES = 2048
#: Images decoded per task (and per progress bar update).
DECODE_CHUNK = 256


class SplitFiles(NamedTuple):
    """One split of an ImageFolder tree: display names, sources (a path, or the bytes of an archive member),
    labels, and the class names the labels index into."""

    names: list[str]
    sources: list
    labels: list[int]
    classes: list[str]


# ----------------------------------------------------------------------------------------------------------------
# Decoding
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
                  progress: bool = False, source: Path | None = None) -> ImageData:
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
    result = ImageData(decoded["train"][0], decoded["val"][0])
    if progress:
        skipped = sum(len(s) for _, s in decoded.values())
        status(f"evoprune: decoded {result.describe()} in {time.perf_counter() - start:.1f}s"
               + (f", skipped {skipped} unreadable" if skipped else "")
               + (f"; cached in {entry}" if cached else "; not cached"))
    return result


def warn_skipped(split: str, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {split}/, e.g. {skipped[0]}", stacklevel=4)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$EVOPRUNE_CACHE`` if set, else ``~/.cache/evoprune``."""
    return Path(os.environ.get("EVOPRUNE_CACHE") or Path.home() / ".cache" / "evoprune")


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


def read_cache(entry: Path, on_corrupt: str) -> ImageData | None:
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
    return ImageData(sets["train"], sets["val"])
