"""The networks of Iizuka et al. 2017, their losses and training steps, hole masks and post-processing.

Pure maths: torch, NumPy and OpenCV only. Nothing here reads or writes storage (that is
``pipeline/``, which imports from here, never the other way; tests/test_layering.py checks it).

The public names are re-exported lazily (PEP 562): ``from model.masks import generate_mask`` in a
light Ray Data task must not import torch just because this package re-exports the networks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "model.completion": (
        "COMPLETION_LAYERS",
        "CompletionNetwork",
        "composite",
        "count_parameters",
        "images_to_tensor",
        "masks_to_tensor",
        "prepare_input",
        "tensor_to_images",
    ),
    "model.discriminator": (
        "ContextDiscriminator",
        "GlobalDiscriminator",
        "LocalDiscriminator",
        "crop_patches",
    ),
    "model.masks": (
        "MASK_KINDS",
        "RectangleMask",
        "derive_seed",
        "freeform_mask",
        "generate_mask",
        "rectangle_mask",
    ),
    "model.poisson": ("BlendResult", "poisson_blend", "poisson_solve"),
    "model.postprocess": ("blend",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


if TYPE_CHECKING:
    from model.completion import (  # noqa: F401
        COMPLETION_LAYERS,
        CompletionNetwork,
        composite,
        count_parameters,
        images_to_tensor,
        masks_to_tensor,
        prepare_input,
        tensor_to_images,
    )
    from model.discriminator import (  # noqa: F401
        ContextDiscriminator,
        GlobalDiscriminator,
        LocalDiscriminator,
        crop_patches,
    )
    from model.masks import (  # noqa: F401
        MASK_KINDS,
        RectangleMask,
        derive_seed,
        freeform_mask,
        generate_mask,
        rectangle_mask,
    )
    from model.poisson import BlendResult, poisson_blend, poisson_solve  # noqa: F401
    from model.postprocess import blend  # noqa: F401
