"""Loading image data (ImageFolder trees, archives, torchvision layout), the cache, splits and augmentation."""
import io
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evoprune.data as data
import evoprune.data.decoding as decoding
from evoprune.data import (CIFAR10_STATS, ChannelStats, ImageData, ImageSet, augment, batches, channel_stats,
                           load_images, normalize, synthetic)
from evoprune.errors import ConfigError, DataError

CLASSES = ["cat", "dog", "frog"]
COLOURS = {"cat": (220, 40, 40), "dog": (40, 220, 40), "frog": (40, 40, 220)}


def make_tree(root: Path, per_class=(6, 2), size=16, fmt="png") -> Path:
    """train/<class>/*.png and val/<class>/*.png, each class a noisy tint, every image distinct."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-30, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.{fmt}")
    return root


def make_archive(tree: Path, archive: Path, *, top: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "val"):
            tar.add(tree / split, arcname=f"{top}/{split}" if top else split)
    return archive


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "tree")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def imageset(labels, size=8, seed=0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(labels), 3, size, size), dtype=torch.uint8, generator=generator)
    return ImageSet(images, torch.tensor(labels, dtype=torch.int64), ["a", "b", "c", "d"][: max(labels) + 1])


# ---------------------------------------------------------------------------------------------------------------
# Loading and caching
# ---------------------------------------------------------------------------------------------------------------

def check_tree_sets(train, val):
    assert train.images.shape == (18, 3, 16, 16) and train.images.dtype == torch.uint8
    assert val.images.shape == (6, 3, 16, 16)
    assert train.classes == CLASSES == val.classes
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the dominant channel of each image is its class's colour: decoding kept RGB order
    assert (train.images.float().mean((2, 3)).argmax(1) == train.labels).all()


def test_image_folder_loads_and_is_cached(tree, cache, monkeypatch):
    train, val = load_images(tree, cache_dir=cache)
    check_tree_sets(train, val)
    assert sorted(p.name for p in cache.glob("*/*.pt")) == ["train.pt", "val.pt"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load must come from the cache")

    monkeypatch.setattr(decoding, "decode_images", no_decoding)
    again = load_images(tree, cache_dir=cache)
    assert torch.equal(again.train.images, train.images) and torch.equal(again.val.labels, val.labels)


def test_cache_follows_changes_to_the_files(tree, cache):
    first = load_images(tree, cache_dir=cache)
    Image.new("RGB", (16, 16), (0, 0, 0)).save(tree / "train" / "cat" / "999.png")
    second = load_images(tree, cache_dir=cache)
    assert len(second.train) == len(first.train) + 1


def test_default_cache_dir_comes_from_the_environment(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "envcache"))
    load_images(tree)
    assert len(list((tmp_path / "envcache").glob("*/train.pt"))) == 1


@pytest.mark.parametrize("top", [None, "cifar"])
def test_archive_loads_like_the_tree_and_is_cached(tree, cache, tmp_path, monkeypatch, top):
    archive = make_archive(tree, tmp_path / "data.tar.gz", top=top)
    train, val = load_images(archive, cache_dir=cache)
    check_tree_sets(train, val)
    reference = load_images(tree, cache_dir=tmp_path / "other-cache")
    assert torch.equal(train.images, reference.train.images)

    monkeypatch.setattr(decoding, "decode_images", lambda *a, **k: pytest.fail("decoded again"))
    assert torch.equal(load_images(archive, cache_dir=cache).val.images, val.images)


def test_jpeg_tree_loads(tmp_path, cache):
    train, _ = load_images(make_tree(tmp_path / "jpg", fmt="jpg"), cache_dir=cache)
    assert train.images.shape == (18, 3, 16, 16)
    assert (train.images.float().mean((2, 3)).argmax(1) == train.labels).all()


def test_process_pool_decodes_like_one_process(tree):
    files = sorted((tree / "train").glob("*/*.png")) + [tree / "train" / "cat"]  # a folder is unreadable
    pooled = data.decode_images(files, workers=2)
    single = data.decode_images(files, workers=1)
    assert len(pooled) == len(files) and isinstance(pooled[-1], str)
    assert all(np.array_equal(a, b) for a, b in zip(pooled[:-1], single[:-1]))


@pytest.mark.parametrize("form", ["tree", "archive"])
def test_loading_off_a_terminal_leaves_plain_status_lines(tree, cache, tmp_path, capfd, monkeypatch, form):
    """With stderr not a terminal (a log file): no bars, one line before and one after decoding (what, how many,
    where it is cached), one line for a load from the cache; no carriage return or escape; nothing on stdout."""
    monkeypatch.delenv("EVOPRUNE_PROGRESS", raising=False)
    source = tree if form == "tree" else make_archive(tree, tmp_path / "data.tar.gz")
    load_images(source, cache_dir=cache)
    out, err = capfd.readouterr()
    assert out == "" and "\r" not in err and "\x1b" not in err
    entry = next(cache.iterdir())
    expected = [f"evoprune: reading {source}"] if form == "archive" else []
    expected += [f"evoprune: decoding 24 images (18 train, 6 val) of {source}",
                 "evoprune: decoded 18 train + 6 val images (3x16x16, 3 classes) in "]
    lines = err.splitlines()
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected)), err
    assert lines[-1].endswith(f"s; cached in {entry}")

    load_images(source, cache_dir=cache)
    assert capfd.readouterr() == (
        "", f"evoprune: loaded 18 train + 6 val images (3x16x16, 3 classes) of {source} from the cache {entry}\n")
    load_images(source, cache_dir=tmp_path / "other", progress=False)
    load_images(source, cache_dir=tmp_path / "other", progress=False)
    assert capfd.readouterr() == ("", "")


def test_decoding_draws_bars_when_forced(tree, cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_PROGRESS", "1")
    load_images(make_archive(tree, tmp_path / "data.tar.gz"), cache_dir=cache)
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" in err and "reading archive" in err and "decoding train" in err and "decoding val" in err
    assert "/18 [" in err and "/6 [" in err and "img/s" in err  # image counts (redraws are rate-limited)
    assert "cached in" in err and "\x1b" not in err


def test_process_pool_decoding_counts_images_in_its_bar(tree, capsys, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_PROGRESS", "1")
    files = sorted((tree / "train").glob("*/*.png"))
    pooled = data.decode_images(files, workers=2, progress=True, desc="pooled")
    assert all(np.array_equal(a, b) for a, b in zip(pooled, data.decode_images(files, workers=1)))
    out, err = capsys.readouterr()
    assert out == "" and "pooled" in err and "/18 [" in err


def test_torchvision_layout_is_read_with_train_and_test(tmp_path, monkeypatch):
    class FakeCIFAR10:
        def __init__(self, root, train, download):
            count = 5 if train else 2
            self.data = np.full((count, 32, 32, 3), 7 if train else 9, dtype=np.uint8)
            self.targets = list(range(count))
            self.classes = list("abcdefghij")

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train, val = load_images(path, cache_dir=tmp_path / "cache")
        assert train.images.shape == (5, 3, 32, 32) and val.images.shape == (2, 3, 32, 32)
        assert int(train.images[0, 0, 0, 0]) == 7 and int(val.images[0, 0, 0, 0]) == 9


def test_broken_torchvision_layout(tmp_path, monkeypatch):
    def corrupted(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted.")

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr("torchvision.datasets.CIFAR10", corrupted)
    with pytest.raises(DataError, match="not a complete torchvision CIFAR-10 folder"):
        load_images(tmp_path, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------

def assert_lists_accepted_forms(message: str):
    assert "cifar-10-batches-py" in message
    assert "train/<class>" in message and "val/<class>" in message
    assert ".tar.gz" in message
    assert "download" in message and "network" in message


def test_missing_path_lists_the_accepted_forms(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_images(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    assert_lists_accepted_forms(str(info.value))


def test_folder_without_data_lists_the_accepted_forms(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError) as info:
        load_images(tmp_path, cache_dir=tmp_path / "cache")
    assert_lists_accepted_forms(str(info.value))


def test_offline_download_gives_guidance(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(DataError, match="could not be downloaded") as info:
        load_images(tmp_path / "cifar", download=True, cache_dir=tmp_path / "cache")
    assert_lists_accepted_forms(str(info.value))
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_unknown_class_in_val(tree, cache, monkeypatch):
    (tree / "val" / "horse").mkdir()
    Image.new("RGB", (16, 16)).save(tree / "val" / "horse" / "0.png")
    monkeypatch.setattr(decoding, "decode_images", lambda *a, **k: pytest.fail("must fail before decoding"))
    with pytest.raises(DataError, match=r"unknown classes \['horse'\]"):
        load_images(tree, cache_dir=cache)


def test_empty_split(tmp_path, cache):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="empty split"):
        load_images(tmp_path, cache_dir=cache)


def test_class_folder_without_images(tree, cache):
    for image in (tree / "val" / "dog").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="holds no images"):
        load_images(tree, cache_dir=cache)


def test_corrupt_image_is_skipped_with_a_counted_warning(tree, cache):
    (tree / "train" / "dog" / "bad1.png").write_bytes(b"not an image")
    (tree / "train" / "frog" / "bad2.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) in train/"):
        train, val = load_images(tree, cache_dir=cache)
    assert len(train) == 18 and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    with pytest.warns(UserWarning, match="skipped 2"):  # the cached result still reports them
        load_images(tree, cache_dir=cache)


def test_corrupt_image_raises_naming_the_file(tree, cache):
    (tree / "train" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png"):
        load_images(tree, cache_dir=cache, on_corrupt="error")
    with warnings.catch_warnings():  # build the cache while skipping, then ask for strictness
        warnings.simplefilter("ignore")
        load_images(tree, cache_dir=cache)
    with pytest.raises(DataError, match="bad.png"):
        load_images(tree, cache_dir=cache, on_corrupt="error")


def test_bad_on_corrupt_value(tree, cache):
    with pytest.raises(ConfigError):
        load_images(tree, cache_dir=cache, on_corrupt="ignore")


@pytest.mark.parametrize("name", ["../evil.png", "/tmp/evil.png", "train/../../evil.png"])
def test_archive_with_unsafe_member_is_refused(tree, cache, tmp_path, name):
    archive = make_archive(tree, tmp_path / "evil.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    evil = tarfile.TarInfo(name)
    evil.size = 4
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)
        tar.addfile(evil, io.BytesIO(b"evil"))
    with pytest.raises(DataError, match="unsafe member"):
        load_images(archive, cache_dir=cache)
    assert not (tmp_path / "evil.png").exists()


def test_archive_without_splits(tmp_path, cache):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("x")
    archive = tmp_path / "stuff.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "stuff", arcname="stuff")
    with pytest.raises(DataError, match="no train/ and val/"):
        load_images(archive, cache_dir=cache)


def test_truncated_archive(tree, cache, tmp_path):
    archive = make_archive(tree, tmp_path / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot be read as a tar archive"):
        load_images(archive, cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------
# ImageSet
# ---------------------------------------------------------------------------------------------------------------

def test_stratified_split_keeps_every_class_in_both_parts():
    labels = [0] * 10 + [1] * 20 + [2] * 30  # sorted class by class, as ImageFolder lists them
    full = imageset(labels)
    index = torch.arange(len(full))
    full.images[:, 0, 0, 0] = index.to(torch.uint8)  # tag every image with its position
    a, b = full.stratified_split(0.5, seed=3)
    assert len(a) == 30 and len(b) == 30
    assert a.class_counts().tolist() == [5, 10, 15] == b.class_counts().tolist()
    tags_a, tags_b = set(a.images[:, 0, 0, 0].tolist()), set(b.images[:, 0, 0, 0].tolist())
    assert not tags_a & tags_b and len(tags_a | tags_b) == 60

    again, _ = full.stratified_split(0.5, seed=3)
    other, _ = full.stratified_split(0.5, seed=4)
    assert torch.equal(again.images, a.images)
    assert not torch.equal(other.images, a.images)


def test_stratified_split_by_count_and_sample():
    full = imageset([0] * 7 + [1] * 7 + [2] * 7)
    a, b = full.stratified_split(10, seed=0)
    assert len(a) == 10 and len(b) == 11
    assert set(a.labels.tolist()) == {0, 1, 2} == set(b.labels.tolist())
    sample = full.stratified_sample(6, seed=1)
    assert sample.class_counts().tolist() == [2, 2, 2]
    assert len(full.stratified_sample(len(full))) == len(full)


@pytest.mark.parametrize("size", [0, 21, 0.0, 1.0, -0.5, True, "half"])
def test_stratified_split_rejects_bad_sizes(size):
    with pytest.raises(ConfigError):
        imageset([0] * 7 + [1] * 7 + [2] * 7).stratified_split(size)


def test_imageset_validates_and_subsets():
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(DataError):
        ImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])
    full = imageset([0, 1, 2, 3])
    part = full.subset([3, 1])
    assert part.labels.tolist() == [3, 1] and torch.equal(part.images[0], full.images[3])
    assert len(full.subset(full.labels >= 2)) == 2


# ---------------------------------------------------------------------------------------------------------------
# Augmentation, normalisation, batches
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_and_dtype_and_changes_images(dtype):
    batch = torch.randint(0, 256, (64, 3, 16, 16), generator=torch.Generator().manual_seed(0)).to(dtype)
    out = augment(batch, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == dtype
    changed = (out != batch).flatten(1).any(1)
    assert changed.sum() > 32  # 1 in 162 images gets the identity (no shift, no flip)
    assert torch.equal(augment(batch, torch.Generator().manual_seed(1)), out)


def test_augment_of_a_constant_image_stays_constant():
    batch = torch.full((16, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(augment(batch, torch.Generator().manual_seed(0)), batch)


def test_augment_is_a_reflect_padded_crop_or_its_mirror():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(1, 3, 8, 8)
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4), mode="reflect")
    crops = [padded[..., y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
    crops += [crop.flip(-1) for crop in crops]
    for seed in range(20):
        out = augment(image, torch.Generator().manual_seed(seed))
        assert any(torch.equal(out, crop) for crop in crops)


def test_normalize():
    batch = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = normalize(batch, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -2.0, -0.5]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([1.0, 2.0, 0.5]))


def test_batches_cover_the_set_in_order_or_shuffled():
    full = imageset([0, 1, 2, 3] * 5)
    plain = list(batches(full, 8))
    assert [len(y) for _, y in plain] == [8, 8, 4]
    assert torch.equal(torch.cat([y for _, y in plain]), full.labels)
    assert plain[0][0].dtype == torch.float32 and plain[0][0].shape == (8, 3, 8, 8)

    shuffled = list(batches(full, 8, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(y) for _, y in shuffled] == [8, 8]
    assert torch.cat([y for _, y in shuffled]).tolist() != full.labels[:16].tolist()
    assert data.num_batches(full, 8) == 3 and data.num_batches(full, 8, drop_last=True) == 2

    (augmented, labels), = batches(full, 20, augment=True, generator=torch.Generator().manual_seed(0))
    (unaugmented, _), = batches(full, 20)
    assert augmented.shape == unaugmented.shape and torch.equal(labels, full.labels)
    assert not torch.equal(augmented, unaugmented)


# ---------------------------------------------------------------------------------------------------------------
# Normalisation statistics
# ---------------------------------------------------------------------------------------------------------------

def test_channel_stats_of_a_synthetic_set_are_its_pixel_mean_and_std():
    train = synthetic(200, 40, classes=4, size=16, seed=3).train
    stats = channel_stats(train)
    pixels = train.images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(torch.tensor(stats.mean, dtype=torch.float64), pixels.mean(1), atol=1e-9)
    assert torch.allclose(torch.tensor(stats.std, dtype=torch.float64), pixels.std(1, unbiased=False), atol=1e-9)
    # normalised with them, every channel of the set has mean 0 and std 1
    out = normalize(train.images, *stats).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(out.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(1, unbiased=False), torch.ones(3), atol=1e-4)


def test_channel_stats_of_known_pixels_and_in_chunks(monkeypatch):
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255                      # channel 0: all 255 except one pixel -> mean 15/16
    images[0, 0, 0, 0] = 0
    images[:2, 1] = 255                     # channel 1: half 0, half 255 -> mean 0.5, std 0.5
    images[:, 2, 0] = 51                    # channel 2: half 0, half 51 -> mean 0.1, std 0.1
    labels = torch.tensor([0, 1, 0, 1])
    stats = channel_stats(ImageSet(images, labels, ["a", "b"]))
    assert stats.mean == pytest.approx((15 / 16, 0.5, 0.1)) and stats.std[1:] == pytest.approx((0.5, 0.1))
    assert stats.std[0] == pytest.approx((15 / 16 - (15 / 16) ** 2) ** 0.5)
    monkeypatch.setattr("evoprune.data.sets.STATS_CHUNK_VALUES", 5)  # one image per chunk
    assert channel_stats(ImageSet(images, labels, ["a", "b"])) == stats


def test_channel_stats_refuse_empty_sets_and_constant_channels():
    constant = ImageSet(torch.full((3, 3, 4, 4), 9, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match=r"channel\(s\) \[0, 1, 2\].*std is 0"):
        channel_stats(constant)
    with pytest.raises(DataError, match="empty"):
        channel_stats(constant.subset(torch.zeros(3, dtype=torch.bool)))


def test_normalize_with_custom_stats_and_their_checks():
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 1, 1)
    stats = ChannelStats((0.2, 0.2, 0.2), (0.1, 0.2, 0.4))
    out = normalize(batch, *stats)
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[-2.0, -1.0, -0.5], [0.0, 0.0, 0.0], [8.0, 4.0, 2.0]]))
    assert torch.allclose(normalize(batch), normalize(batch, *CIFAR10_STATS))  # CIFAR-10's are the default
    assert not torch.allclose(out, normalize(batch))
    with pytest.raises(ConfigError, match=r"^mean has 2 value\(s\) but the batch has 3 channels") as info:
        normalize(batch, (0.5, 0.5), (0.2, 0.2, 0.2))
    assert info.value.setting == "mean"
    with pytest.raises(ConfigError, match="^std must be > 0"):
        normalize(batch, (0.5, 0.5, 0.5), (0.2, 0.0, 0.2))


@pytest.mark.parametrize("mean, std, message", [
    ((0.5, 0.5), (0.2, 0.2, 0.2), r"^std has 3 value\(s\) but mean has 2"),
    ((0.5, 0.5, 0.5), (0.2, -0.1, 0.2), "^std must be > 0"),
    ((0.5, float("nan"), 0.5), (0.2, 0.2, 0.2), "^mean must hold one finite number"),
    ((), (), "^mean must hold one finite number"),
    ("abc", (0.2, 0.2, 0.2), "^mean must be a sequence of numbers"),
    ((0.5, 0.5, 0.5), "5", "^std must be a sequence of numbers"),
])
def test_channel_stats_are_checked_when_made(mean, std, message):
    with pytest.raises(ConfigError, match=message) as info:
        ChannelStats(mean, std)
    setting = message.lstrip("^").split()[0]  # the setting is named, so a command line can put its flag there
    assert info.value.setting == setting and info.value.named("--" + setting) == f"--{str(info.value)}"


def test_image_data_carries_train_stats_into_splits_and_batches():
    data = synthetic(120, 60, classes=3, size=8, seed=1)
    assert data.stats == CIFAR10_STATS and data.val.stats == CIFAR10_STATS
    own = data.with_train_stats()
    assert isinstance(own, ImageData) and own.train.images is data.train.images
    assert own.stats == channel_stats(data.train) == own.val.stats
    half, _ = own.val.stratified_split(0.5, seed=0)
    assert half.stats == own.stats and own.train.stratified_sample(30).stats == own.stats

    (x, _), = batches(own.train, len(own.train))
    assert torch.allclose(x.transpose(0, 1).reshape(3, -1).mean(1), torch.zeros(3), atol=1e-4)
    (cifar, _), = batches(data.train, len(data.train))
    assert torch.allclose(cifar, normalize(data.train.images))
    (given, _), = batches(own.train, len(own.train), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.allclose(given, normalize(data.train.images, (0.5,) * 3, (0.25,) * 3))

    pair = data.with_stats(((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert pair.val.stats == ChannelStats((0.5,) * 3, (0.25,) * 3)


def test_stats_must_fit_the_images():
    with pytest.raises(ConfigError, match=r"2 value\(s\) but the images have 3 channel"):
        imageset([0, 1]).with_stats(ChannelStats((0.5, 0.5), (0.2, 0.2)))
    with pytest.raises(ConfigError, match=r"\(mean, std\) pair"):
        synthetic(40, 20).with_stats("train")


def test_loaded_data_default_to_cifar_stats_and_can_use_their_own(tree, cache):
    loaded = load_images(tree, cache_dir=cache, progress=False)
    assert loaded.stats == CIFAR10_STATS
    own = loaded.with_train_stats()
    assert own.val.stats == channel_stats(loaded.train)
    # one class per primary tint (220 on its channel, 40 on the others): every channel averages 100 / 255
    assert own.stats.mean == pytest.approx((100 / 255,) * 3, abs=0.01) and own.stats != CIFAR10_STATS
