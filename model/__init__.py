"""The networks of Iizuka et al. 2017, their hole masks, post-processing and checkpoints."""

from model.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    ModelConfig,
    load_checkpoint,
    load_generator,
    save_checkpoint,
)
from model.completion import COMPLETION_LAYERS, CompletionNetwork, composite, count_parameters, prepare_input
from model.discriminator import ContextDiscriminator, GlobalDiscriminator, LocalDiscriminator, crop_patches
from model.masks import (
    MASK_GENERATORS,
    RectangleMask,
    derive_seed,
    freeform_mask,
    generate_mask,
    rectangle_mask,
)

__all__ = [
    "COMPLETION_LAYERS",
    "MASK_GENERATORS",
    "CheckpointError",
    "CompletionNetwork",
    "ContextDiscriminator",
    "GlobalDiscriminator",
    "LoadedCheckpoint",
    "LocalDiscriminator",
    "ModelConfig",
    "RectangleMask",
    "composite",
    "count_parameters",
    "crop_patches",
    "derive_seed",
    "freeform_mask",
    "generate_mask",
    "load_checkpoint",
    "load_generator",
    "prepare_input",
    "rectangle_mask",
    "save_checkpoint",
]
