"""Fixtures for the model tests: reference-named state dicts built from the reference's key templates.

The templates follow the reference implementation's module tree (``downsample_layers``, ``stages.s.b``,
``large_kernel.LoRA1/LoRA2/small_conv/lkb_origin``, ``pwconv1/2``), written here independently of
``slak_model.checkpoint`` so that the loader is tested against the reference layout, not against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

RefShapes = dict[str, tuple[int, ...]]


def reference_shapes(
    depths: Sequence[int] = (3, 3, 9, 3),
    widths: Sequence[int] = (124, 249, 499, 998),
    kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
    decom: bool = True,
    bn: bool = True,
    layer_scale: bool = True,
    num_classes: int = 1000,
    in_chans: int = 3,
) -> RefShapes:
    """Key -> shape of the reference ``SLaK`` state dict, in the reference's order (``()`` = int64 scalar)."""
    shapes: RefShapes = {}
    d = list(widths)
    shapes["downsample_layers.0.0.weight"] = (d[0], in_chans, 4, 4)
    shapes["downsample_layers.0.0.bias"] = (d[0],)
    shapes["downsample_layers.0.1.weight"] = (d[0],)
    shapes["downsample_layers.0.1.bias"] = (d[0],)
    for i in range(1, len(d)):
        shapes[f"downsample_layers.{i}.0.weight"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.0.bias"] = (d[i - 1],)
        shapes[f"downsample_layers.{i}.1.weight"] = (d[i], d[i - 1], 2, 2)
        shapes[f"downsample_layers.{i}.1.bias"] = (d[i],)
    n = kernel_size[4]
    for s, depth in enumerate(depths):
        c, k = d[s], kernel_size[s]
        branches = {"LoRA1": (c, 1, k, n), "LoRA2": (c, 1, n, k)} if decom else {"lkb_origin": (c, 1, k, k)}
        if n < k:
            branches["small_conv"] = (c, 1, n, n)
        for b in range(depth):
            p = f"stages.{s}.{b}."
            if layer_scale:
                shapes[p + "gamma"] = (c,)
            for name, shape in branches.items():
                shapes[f"{p}large_kernel.{name}.conv.weight"] = shape
                if bn:
                    for leaf in ("weight", "bias", "running_mean", "running_var"):
                        shapes[f"{p}large_kernel.{name}.bn.{leaf}"] = (c,)
                    shapes[f"{p}large_kernel.{name}.bn.num_batches_tracked"] = ()
            shapes[p + "norm.weight"] = (c,)
            shapes[p + "norm.bias"] = (c,)
            shapes[p + "pwconv1.weight"] = (4 * c, c)
            shapes[p + "pwconv1.bias"] = (4 * c,)
            shapes[p + "pwconv2.weight"] = (c, 4 * c)
            shapes[p + "pwconv2.bias"] = (c,)
    shapes["norm.weight"] = (d[-1],)
    shapes["norm.bias"] = (d[-1],)
    shapes["head.weight"] = (num_classes, d[-1])
    shapes["head.bias"] = (num_classes,)
    return shapes


def fill_reference(shapes: RefShapes, seed: int = 0, zeros: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for ``shapes``: random O(1) values (positive running_var, gamma ~ 1), or zeros."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if shape == ():
            out[key] = torch.tensor(7, dtype=torch.int64)
        elif zeros:
            out[key] = torch.zeros(shape)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("gamma") or key.endswith("bn.weight") or key.endswith("norm.weight"):
            out[key] = 1.0 + 0.5 * torch.randn(shape, generator=g)
        elif len(shape) == 4 and shape[1] == 1:  # depthwise kernels: scale so sums stay O(1)
            out[key] = torch.randn(shape, generator=g) / (shape[2] * shape[3]) ** 0.5
        elif len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        else:
            out[key] = 0.3 * torch.randn(shape, generator=g)
    return out


#: The reference-style arguments of ``slak_test`` (depths 1-1-2-1, widths 8-16-24-32, 13/11/9/7 with N=3).
TEST_ARCH = {
    "depths": (1, 1, 2, 1),
    "widths": (8, 16, 24, 32),
    "kernel_size": (13, 11, 9, 7, 3),
    "num_classes": 10,
}


@pytest.fixture
def reference_state_dict() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``reference_state_dict(seed=0, zeros=False, **reference_shapes kwargs)``."""

    def make(seed: int = 0, zeros: bool = False, **kwargs) -> dict[str, torch.Tensor]:
        return fill_reference(reference_shapes(**kwargs), seed=seed, zeros=zeros)

    return make


@pytest.fixture
def ref_shapes() -> Callable[..., RefShapes]:
    """The :func:`reference_shapes` template builder."""
    return reference_shapes


@pytest.fixture
def test_arch() -> dict:
    """Reference-style arguments of ``slak_test`` (a copy; tests may edit it)."""
    return dict(TEST_ARCH)
