"""Storage: atomic writes give the permissions a plain write gives, and loading names what a file is when it is not
what was expected (not a PyTorch file, cut off, TorchScript, a pickled model, a state_dict)."""
from __future__ import annotations

import os
import pickle
import stat

import pytest
import torch
import torch.nn as nn

from evoprune.errors import CheckpointError, ConfigError
from evoprune.storage import atomic_write, load_module, load_state_dict, sniff, torch_save, write_json, write_text

WRITERS = {
    "write_json": lambda p: write_json(p, {"a": 1}),
    "write_text": lambda p: write_text(p, "text\n"),
    "torch_save": lambda p: torch_save({"w": torch.zeros(2)}, p),
    "atomic_write": lambda p: _atomic_bytes(p),
}


def _atomic_bytes(path):
    with atomic_write(path, "wb") as fh:
        fh.write(b"bytes")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    before = os.umask(0o022)
    os.umask(before)
    yield lambda value: os.umask(value)
    os.umask(before)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_a_new_file_gets_the_mode_a_plain_open_gives(writer, mask, umask, tmp_path):
    umask(mask)
    with open(tmp_path / "plain", "w") as fh:  # the reference: what open(path, "w") does under this umask
        fh.write("x")
    WRITERS[writer](tmp_path / "atomic")
    assert mode(tmp_path / "atomic") == mode(tmp_path / "plain")
    assert mode(tmp_path / "atomic") == 0o666 & ~mask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("writer", WRITERS)
def test_replacing_a_file_keeps_its_mode(writer, umask, tmp_path):
    umask(0o022)
    path = tmp_path / "out"
    path.write_text("old")
    os.chmod(path, 0o640)
    WRITERS[writer](path)
    assert mode(path) == 0o640
    assert path.read_bytes() != b"old"


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.json", "w") as fh:
            fh.write("{")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ what a file is

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of each kind: state_dict, whole pickled model, TorchScript, text, random bytes, empty, cut-off."""
    d = tmp_path_factory.mktemp("files")
    net = nn.Sequential(nn.Linear(3, 2))
    torch.save(net.state_dict(), d / "sd.pt")
    torch.save(net, d / "whole.pt")
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3)), d / "ts.pt")
    torch.save(net.state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    (d / "text.txt").write_text("hello world\nnot a model\n")
    (d / "random.bin").write_bytes(bytes(range(7, 250)) * 3)
    (d / "empty.pt").write_bytes(b"")
    for name in ("sd.pt", "whole.pt", "ts.pt", "legacy.pt"):
        data = (d / name).read_bytes()
        (d / f"cut-{name}").write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("name, kind", [
    ("sd.pt", "torch"), ("whole.pt", "torch"), ("legacy.pt", "torch"), ("ts.pt", "torchscript"),
    ("text.txt", "not-torch"), ("random.bin", "not-torch"), ("empty.pt", "empty"), ("nothing.pt", "missing"),
    ("cut-sd.pt", "corrupt"), ("cut-ts.pt", "corrupt"),
])
def test_sniff_tells_the_kinds_apart(files, name, kind):
    assert sniff(files / name) == kind


@pytest.mark.parametrize("name, reason, words", [
    ("text.txt", "not-torch", "not a PyTorch file"),
    ("random.bin", "not-torch", "not a PyTorch file"),
    ("empty.pt", "empty", "empty"),
    ("cut-sd.pt", "corrupt", "truncated or corrupt"),
    ("cut-legacy.pt", "corrupt", "truncated or corrupt"),
    ("ts.pt", "torchscript", "TorchScript"),
    ("whole.pt", "pickle", "pickled Python objects"),
    ("nothing.pt", "missing", "no such file"),
])
def test_load_state_dict_says_what_the_file_is(files, name, reason, words):
    with pytest.raises(CheckpointError) as info:
        load_state_dict(files / name)
    assert info.value.reason == reason
    assert words in str(info.value) and str(files / name) in str(info.value)
    assert "KeyError" not in str(info.value) and "trust=True (CLI" not in str(info.value)


def test_load_state_dict_reads_both_torch_formats(files):
    for name in ("sd.pt", "legacy.pt"):
        assert set(load_state_dict(files / name)) == {"0.weight", "0.bias"}


@pytest.mark.parametrize("name, trust, reason, words", [
    ("text.txt", False, "not-torch", "not a PyTorch file"),
    ("text.txt", True, "not-torch", "not a PyTorch file"),
    ("cut-whole.pt", True, "corrupt", "truncated or corrupt"),
    ("cut-ts.pt", False, "corrupt", "truncated or corrupt"),
    ("sd.pt", False, "state_dict", "state_dict"),
    ("sd.pt", True, "state_dict", "state_dict"),
    ("whole.pt", False, "untrusted", "trust"),
])
def test_load_module_says_what_the_file_is(files, name, trust, reason, words):
    with pytest.raises(CheckpointError) as info:
        load_module(files / name, trust=trust)
    assert info.value.reason == reason and words in str(info.value)


def test_load_module_loads_what_it_should(files):
    assert isinstance(load_module(files / "ts.pt"), torch.jit.ScriptModule)
    assert isinstance(load_module(files / "whole.pt", trust=True), nn.Sequential)


def test_error_attributes_survive_pickling():
    """SCOOP workers send errors back pickled: the setting and reason must come with them."""
    config = pickle.loads(pickle.dumps(ConfigError("must be a probability in [0, 1], got 2", setting="p_c")))
    assert config.setting == "p_c" and str(config) == "p_c must be a probability in [0, 1], got 2"
    assert config.named("--p-c") == "--p-c must be a probability in [0, 1], got 2"
    checkpoint = pickle.loads(pickle.dumps(CheckpointError("x: cut off", reason="corrupt")))
    assert checkpoint.reason == "corrupt" and str(checkpoint) == "x: cut off"
    plain = ConfigError("something else is wrong")
    assert plain.setting is None and plain.named("--flag") == "something else is wrong"
