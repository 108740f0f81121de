"""Families beyond the torchvision matrix of test_space: blocks that take two inputs (tree aggregation), ghost
modules (``cat([x, cheap(x)])`` sliced to the output width), ConvNeXt's ``nn.Linear`` on channels-last tensors, and
a sweep over timm CNNs (random init, no download).

Every model here either builds a space in which one random plan (with a connection cut where there are units)
prunes physically (apply_plan and slice_plan), costs exactly what torch-pruning counts and evaluates masked as the
pruned model does (test_space's ``_check_plan``), or is refused with ONE evoprune error that names the layers; a raw
IndexError / TypeError / RuntimeError anywhere fails the test."""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import test_slicing as tsl
import test_space as ts
from evoprune import EvoPruneError, PruningSpace, slice_plan
from evoprune.errors import UntraceableWarning

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ---------------------------------------------------------------------------------------------- helpers
def _wake_layer_scales(model: nn.Module, seed: int = 3) -> nn.Module:
    """ConvNeXt-style layer scales start at 1e-6, which makes every block a no-op: a channel masked in the wrong
    place would hide under the tolerance. Give them values around 1 (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rpartition(".")[2]
            if leaf in ("gamma", "layer_scale") and p.numel() and float(p.abs().max()) < 1e-3:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return model


def _built(name, model, x, randomize_bn, *, expect_warning=None) -> ts.Built:
    """``model`` (BN statistics randomised, layer scales woken) with its space; ``expect_warning``: a regex the
    one UntraceableWarning must match (None: no warning at all)."""
    model = _wake_layer_scales(randomize_bn(model, seed=1)).eval()
    with torch.no_grad():
        out = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntraceableWarning)
        space = PruningSpace.from_model(model, x)
    found = [str(w.message) for w in caught if issubclass(w.category, UntraceableWarning)]
    if expect_warning is None:
        assert not found, found
    else:
        assert len(found) == 1, found
        assert re.search(expect_warning, found[0]), found[0]
    return ts.Built(name, model, x, space, out)


def _left_out_layers(message: str) -> list[str]:
    """The layers an UntraceableWarning (or a refusal) says are left out."""
    return [layer for part in re.findall(r"keep their width: (.*?)(?:; |\. The other|\. Nothing|$)", message)
            for layer in part.split(", ")]


def _check(b: ts.Built, plan, state_guard):
    """test_space's check (apply_plan runs, cost == torch-pruning's count, masked == physical), then slice_plan
    against the apply_plan model (test_slicing's comparison)."""
    pruned, macs, params = ts._check_plan(b, plan, state_guard)
    tsl._assert_same_model(slice_plan(b.model, plan, b.space), pruned, b.x)
    return pruned


def _plan(space, random_individual, seed, keep=0.5):
    return space.decode(ts._individual(space, keep, random_individual, seed=seed))


def _x(size, seed=2):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cbr(i, o, k=3, groups=1, act=True):
    layers = [nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
    return nn.Sequential(*layers, *([nn.ReLU()] if act else []))


# ---------------------------------------------------------------------------------------------- 1. two-input blocks
class _TwoInputBlock(nn.Module):
    """A DLA-style block: ``forward(x, shortcut=None)``, the shortcut defaulting to x."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = _cbr(c, c), _cbr(c, c, act=False)

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return torch.relu(self.conv2(self.conv1(x)) + shortcut)


class _Tree(nn.Module):
    """tree1 is called with two tensors (x and its shortcut, here x itself), tree2 with one; a root joins them."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.tree1, self.tree2 = _TwoInputBlock(8), _TwoInputBlock(8)
        self.post = _TwoInputBlock(8)
        self.root = _cbr(16, 12, k=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.stem(x)
        x1 = self.tree1(x, x)  # two tensor inputs: nn.Identity cannot stand in for it
        x2 = self.tree2(x1)
        y = self.root(torch.cat([x2, self.post(x1, shortcut=x1)], 1))  # the same, by keyword
        return self.fc(y.mean((2, 3)))


def test_a_block_with_two_inputs_is_no_connection_unit(randomize_bn, random_individual, state_guard):
    torch.manual_seed(0)
    b = _built("tree", _Tree(), _x(8), randomize_bn)
    units = [u.name for u in b.space.units if u.kind == "residual"]
    # tree1(x, x) and post(x1, shortcut=x1) add their input but take two tensors: never units. tree2(x1) takes one
    assert units == ["tree2"]
    members = {m for g in b.space.groups for m in g.members}
    assert {"tree1.conv1.0", "post.conv1.0"} <= members  # their channels are still prunable
    genes = ts._individual(b.space, 0.5, random_individual, seed=11)
    genes[b.space.layout.n_neurons:] = [0] * len(b.space.units)  # cut every unit
    plan = b.space.decode(genes)
    assert "tree2" in plan.cut and not {"tree1", "post"} & set(plan.cut)
    pruned = _check(b, plan, state_guard)
    assert isinstance(pruned.tree2, nn.Identity) and not isinstance(pruned.tree1, nn.Identity)


class _CatsItsInput(nn.Module):
    """A DLA root: ``cat([block(x), x])``. Cutting the block would feed x twice into the concat (cat([x, x])),
    which torch-pruning cannot map: the block is no unit, although it takes one tensor and adds it."""

    def __init__(self):
        super().__init__()
        self.stem, self.block, self.root, self.fc = _cbr(3, 8), _TwoInputBlock(8), _cbr(16, 8, k=1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(self.root(torch.cat([self.block(x), x], 1)).mean((2, 3)))


def test_a_block_whose_cut_would_concatenate_a_tensor_with_itself_is_no_unit(randomize_bn, random_individual,
                                                                               state_guard):
    torch.manual_seed(0)
    b = _built("cats_its_input", _CatsItsInput(), _x(8), randomize_bn)
    assert "block" not in [u.name for u in b.space.units]
    _check(b, _plan(b.space, random_individual, 5), state_guard)


# ---------------------------------------------------------------------------------------------- 2. ghost modules
class _Ghost(nn.Module):
    """GhostNet's module: a primary conv, a cheap depthwise conv of its output, both concatenated and sliced to
    the output width (a no-op for an even width; it drops the last cheap channel for an odd one)."""

    def __init__(self, i, o, act=True):
        super().__init__()
        self.oup = o
        init = math.ceil(o / 2)
        self.primary_conv = _cbr(i, init, k=1, act=act)
        self.cheap_operation = _cbr(init, init, groups=init, act=act)

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], 1)
        return out[:, :self.oup, :, :]


class _GhostExpansion(nn.Module):
    """A ghost module widening 8 -> 24 channels, then a depthwise conv of its 24 (a ghost bottleneck's first half)."""

    def __init__(self):
        super().__init__()
        self.stem, self.ghost = _cbr(3, 8), _Ghost(8, 24)
        self.conv_dw, self.bn_dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.head, self.fc = _cbr(24, 16, k=1), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.head(self.bn_dw(self.conv_dw(self.ghost(self.stem(x))))).mean((2, 3)))


def test_a_ghost_module_feeding_a_depthwise_conv_prunes_exactly(randomize_bn, random_individual, state_guard):
    """torch-pruning roots this group at the depthwise conv, whose 24 channels are two copies of the 12 primary
    ones: the group's genes are the 12 primary channels (the raw root indices used to reach 23: IndexError)."""
    torch.manual_seed(0)
    b = _built("ghost_expansion", _GhostExpansion(), _x(8), randomize_bn)
    g = b.space.group("ghost.primary_conv.0")
    assert g.size == 12 and {"ghost.cheap_operation.0", "conv_dw", "bn_dw"} <= set(g.members)
    for seed in (1, 2):
        pruned = _check(b, _plan(b.space, random_individual, seed), state_guard)
        assert pruned.conv_dw.out_channels == 2 * pruned.ghost.primary_conv[0].out_channels == 12


class _GhostBottleneck(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.ghost1 = _Ghost(c, mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn_dw = nn.BatchNorm2d(mid)
        self.ghost2 = _Ghost(mid, c, act=False)

    def forward(self, x):
        return self.ghost2(self.bn_dw(self.conv_dw(self.ghost1(x)))) + x


class _GhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8)
        self.block = _GhostBottleneck(8, 24)
        self.odd = _Ghost(8, 11)  # 12 channels sliced to 11
        self.head = _cbr(11, 16, k=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.head(self.odd(self.block(self.stem(x)))).mean((2, 3)))


def test_ghost_modules_prune_exactly_or_are_left_out_by_name(randomize_bn, random_individual, state_guard):
    torch.manual_seed(0)
    b = _built("ghost", _GhostNet(), _x(8), randomize_bn,
               expect_warning=r"odd\.primary_conv\.0.*(keep their width|left out)")
    message_layers = ["stem.0", "odd.primary_conv.0"]
    sp = b.space
    groups = {g.name: g for g in sp.groups}
    # the expansion ghost module: 12 primary channels, each feeding two of the 24 the depthwise conv after the
    # concat sees (torch-pruning roots this group at that conv: its 24 indices are not 24 genes)
    g = groups["block.ghost1.primary_conv.0"]
    assert g.size == 12 and "block.conv_dw" in g.members
    dw = next(c for c in g.consumers if c.module == "block.conv_dw")
    assert sorted(zip(dw.root_idxs, dw.idxs)) == sorted([(k, k) for k in range(12)] + [(k, k + 12) for k in range(12)])
    # the residual stream (stem + the second ghost module's concat, added back) maps one stream channel onto two
    # of its own, and the odd module's slice has fixed bounds: both are left out, by name, with the one warning
    for layer in message_layers:
        assert all(layer not in grp.members for grp in sp.groups)
    _check(b, _plan(sp, random_individual, 9), state_guard)
    assert [u.name for u in sp.units if u.kind == "residual"] == ["block"]
    genes = ts._individual(sp, 0.25, random_individual, seed=10)
    genes[sp.layout.n_neurons:] = [1] * len(sp.units)  # the bottleneck stays
    pruned = _check(b, sp.decode(genes), state_guard)
    assert pruned.block.ghost1.primary_conv[0].out_channels == 3 and pruned.block.conv_dw.out_channels == 6


def test_ghost_warning_names_the_left_out_layers(randomize_bn):
    torch.manual_seed(0)
    with pytest.warns(UntraceableWarning) as caught:
        PruningSpace.from_model(randomize_bn(_GhostNet()).eval(), _x(8))
    message = " ".join(str(w.message) for w in caught if issubclass(w.category, UntraceableWarning))
    assert "stem.0" in message and "odd.primary_conv.0" in message and "odd.cheap_operation.0" in message


# ---------------------------------------------------------------------------------------------- 3. ConvNeXt
class _CNBlocks(nn.Module):
    def __init__(self):
        from torchvision.models.convnext import CNBlock
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(CNBlock(16, 1.0, 0.0), CNBlock(16, 1.0, 0.0))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_convnext_block_mlp_channels_prune_through_channels_last_linears(randomize_bn, random_individual,
                                                                         state_guard):
    torch.manual_seed(0)
    b = _built("cnblocks", _CNBlocks(), _x(16), randomize_bn)
    groups = {g.name: g for g in b.space.groups}
    # the MLP's hidden width (Linear 16 -> 64 on (N, H, W, C), GELU, Linear 64 -> 16) is a group; the stream is
    # not (it reaches LayerNorm, which torch-pruning cannot prune exactly)
    assert set(groups) == {"blocks.0.block.3", "blocks.1.block.3"}
    g = groups["blocks.0.block.3"]
    assert g.size == 64 and [(c.module, c.dim, c.width) for c in g.consumers] == [("blocks.0.block.5", -1, 64)]
    assert [u.name for u in b.space.units] == ["blocks.0", "blocks.1"]
    for seed in (1, 2):
        _check(b, _plan(b.space, random_individual, seed), state_guard)


@pytest.mark.slow
def test_torchvision_convnext_tiny_is_pruned(randomize_bn, random_individual, state_guard):
    import torchvision
    torch.manual_seed(0)
    b = _built("convnext_tiny", torchvision.models.convnext_tiny(num_classes=10), _x(32), randomize_bn)
    assert len(b.space.groups) == 18 and all(g.name.endswith("block.3") for g in b.space.groups)
    _check(b, _plan(b.space, random_individual, 3), state_guard)


class _LinearOverWidth(nn.Module):
    """An nn.Linear applied to the LAST axis of an NCHW tensor mixes the width axis, not the channels (here both
    have 8 entries): its flattening view moves channels, and the conv feeding it must not be coupled to it."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix, self.conv2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), \
            nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.conv2(self.mix(self.conv(x))).mean((2, 3)))


class _SplitsChannelsLast(nn.Module):
    """A channels-last reshape that splits the channel axis into heads, (N, H, W, C) -> (N, H, W, 2, C/2), and
    swaps them back transposed: it moves channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 6), \
            nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc1(self.conv(x).permute(0, 2, 3, 1))
        n, h, w, c = y.shape
        y = y.reshape(n, h, w, 2, c // 2).transpose(3, 4).reshape(n, h, w, c)
        return self.fc(self.fc2(y).mean((1, 2)))


@pytest.mark.parametrize("cls, left_out", [(_LinearOverWidth, "conv"), (_SplitsChannelsLast, "fc1")])
def test_views_that_move_channels_are_still_refused(cls, left_out, randomize_bn, random_individual, state_guard):
    torch.manual_seed(0)
    b = _built(cls.__name__, cls(), _x(8), randomize_bn, expect_warning=rf"keep their width: .*\b{left_out}\b")
    assert all(left_out not in g.members for g in b.space.groups)
    _check(b, _plan(b.space, random_individual, 4), state_guard)


# ---------------------------------------------------------------------------------------------- 4. the timm sweep
@dataclass(frozen=True)
class TimmFamily:
    size: int  # input side
    expect: str  # "prune": whole; "partial": prunes, with one UntraceableWarning naming what is left out; "refuse"
    slow: bool = False
    note: str = ""


TIMM = {
    "resnet10t": TimmFamily(32, "prune"),
    "resnet18d": TimmFamily(32, "prune", note="deep stem, avg-pool downsample"),
    "seresnet18": TimmFamily(32, "prune", note="squeeze-excitation"),
    "skresnet18": TimmFamily(32, "partial", note="selective kernel: split/view of its attention"),
    "resnest14d": TimmFamily(32, "prune", note="split attention (radix 2)"),
    "res2net50_14w_8s": TimmFamily(32, "partial", slow=True, note="split/cat of its scales"),
    "regnetx_002": TimmFamily(32, "prune", note="grouped convs"),
    "regnety_002": TimmFamily(32, "prune"),
    "tf_efficientnet_lite0": TimmFamily(32, "prune"),
    "tinynet_e": TimmFamily(32, "prune"),
    "mobilenetv3_small_050": TimmFamily(32, "prune"),
    "lcnet_050": TimmFamily(32, "prune"),
    "semnasnet_050": TimmFamily(32, "prune"),
    "fbnetc_100": TimmFamily(32, "prune"),
    "mixnet_s": TimmFamily(32, "partial", note="mixed kernels: split by sizes"),
    "ghostnet_050": TimmFamily(32, "partial", note="ghost modules; the stem stream maps onto itself twice"),
    "dla46_c": TimmFamily(32, "prune", note="tree aggregation: two-input blocks, roots concatenating a block and "
                                            "its input"),
    "dpn48b": TimmFamily(32, "partial", note="dual path: concat + slices of the dense path"),
    "rexnet_100": TimmFamily(32, "partial", note="channel-padding concat"),
    "hrnet_w18_small": TimmFamily(32, "prune", slow=True, note="multi-resolution fusion with upsampling"),
    "cs3darknet_focus_s": TimmFamily(32, "partial", note="CSP: split/cat"),
    "darknet17": TimmFamily(32, "prune"),
    "ese_vovnet19b_slim": TimmFamily(32, "prune", note="one-shot aggregation: concat"),
    "repvgg_a0": TimmFamily(32, "prune", note="parallel 3x3/1x1/identity branches"),
    "gernet_s": TimmFamily(32, "prune"),
    "selecsls42b": TimmFamily(32, "prune", slow=True),
    "convnext_atto": TimmFamily(32, "prune", note="conv-MLP ConvNeXt: LayerNorm2d"),
    "edgenext_xx_small": TimmFamily(32, "partial", note="channels-last MLP prunes; XCA attention views are left "
                                                        "out"),
    "nf_resnet26": TimmFamily(32, "refuse", note="weight-standardised convs view their weights"),
}
MIN_PRUNED = 24  # families that must actually prune (whole or partly), so that refusing everything cannot pass
SWEEP: dict[str, tuple[str, float]] = {}  # what the sweep saw: name -> (status, seconds)


def _sweep(name: str, fam: TimmFamily, randomize_bn, random_individual, state_guard) -> str:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    model = _wake_layer_scales(randomize_bn(model, seed=1)).eval()
    x = _x(fam.size)
    layers = {n for n, _ in model.named_modules() if n}
    with torch.no_grad():
        out = model(x)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UntraceableWarning)
            space = PruningSpace.from_model(model, x)
    except EvoPruneError as exc:  # a refusal: one evoprune error, naming layers of the model
        message = str(exc)
        assert any(layer in message for layer in layers), message
        return "refuse"
    found = [str(w.message) for w in caught if issubclass(w.category, UntraceableWarning)]
    assert len(found) <= 1, found
    for message in found:  # what is left out is named, layer by layer
        named = _left_out_layers(message)
        assert named and all(layer in layers for layer in named), message
    b = ts.Built(name, model, x, space, out)
    _check(b, _plan(space, random_individual, [*map(ord, name)]), state_guard)
    return "partial" if found else "prune"


# the quick loop (-m "not slow") keeps three cheap families of different kinds; CI runs them all
QUICK = ("resnet10t", "lcnet_050", "convnext_atto")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if f.slow or n not in QUICK else [])
                                  for n, f in TIMM.items()])
def test_timm_family(name, randomize_bn, random_individual, state_guard):
    fam = TIMM[name]
    start = time.perf_counter()
    try:
        status = _sweep(name, fam, randomize_bn, random_individual, state_guard)
    except (AssertionError, EvoPruneError):
        raise
    except Exception as exc:  # a raw IndexError / TypeError / RuntimeError: a bug, whatever the expectation
        pytest.fail(f"{name}: raw {type(exc).__name__} instead of an evoprune error or a clean prune: {exc}")
    SWEEP[name] = (status, time.perf_counter() - start)
    assert status == fam.expect, f"{name}: {status}, expected {fam.expect} ({fam.note})"


def test_timm_sweep_prunes_most_families():
    pruned = [n for n, f in TIMM.items() if f.expect in ("prune", "partial")]
    assert len(TIMM) >= 12 and len(pruned) >= MIN_PRUNED
    # each family's test asserts it reached its expected status, so these pruned for real
    seen = {n: s for n, (s, _) in SWEEP.items()}
    assert all(seen[n] == TIMM[n].expect for n in seen)
    if len(seen) == len(TIMM):
        assert sum(s != "refuse" for s in seen.values()) >= MIN_PRUNED
