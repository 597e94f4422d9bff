"""The Inpaint stage: ``InpaintPredictor``, the callable class Ray Data runs in an actor pool.

Each actor loads the generator once and then only does tensor work: uint8 pixels go to the
device as they are (a quarter of the bytes of float32) and are converted there; the output comes
back as uint8. Decoding, padding bookkeeping, post-processing and encoding happen in the tasks
before and after, so the GPU never waits on the CPU.

A batch can hold images of several sizes; it is split into size buckets (same padded size) and
each bucket is one forward pass, so no image is ever resized or padded beyond its own multiple
of 4 (results are identical to completing each image alone).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import nullcontext

import cv2
import numpy as np
import torch

from model.completion import (
    SIZE_MULTIPLE,
    images_to_tensor,
    masks_to_tensor,
    pad_to_multiple,
    padded_size,
    tensor_to_images,
)
from model.poisson import poisson_blend
from pipeline import faults
from pipeline.manifest import STATUS_ERROR, STATUS_OK

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when this process sees a GPU, else the CPU. Which GPUs a Ray actor sees
    follows what it requested (``num_gpus``); where it computes is this, a separate choice."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"device cuda, but this process sees no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def shrink(image: np.ndarray, mask: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` scaled so the longer side is at most ``max_side`` (as they are if it is).

    The network sees about 300 px around each pixel: a hole of a 4000 px photo is mostly beyond
    its reach at full resolution, and costs (4000 / max_side)^2 times the compute. A pixel partly
    covered by the hole is hole in the small copy, so the hole never shrinks away.
    """
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, mask
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0
    return small, small_mask.astype(np.uint8)


def paste(image: np.ndarray, mask: np.ndarray, completed: np.ndarray) -> np.ndarray:
    """``completed`` (of ``image``'s size, or of its ``shrink``-ed copy) upscaled where needed, taken
    in the hole only: every known pixel stays the full-resolution original."""
    h, w = image.shape[:2]
    if completed.shape[:2] == (h, w):
        return completed
    up = cv2.resize(completed, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.where(mask[..., None].astype(bool), up, image)


class InpaintPredictor:
    def __init__(
        self,
        checkpoint: str,
        *,
        device: str = "auto",
        precision: str = "auto",
        channels_last: bool | None = None,
        postprocess: str = "none",
        max_side: int | None = None,
        endpoint_url: str | None = None,
        num_threads: int | None = None,
        keep_images: bool = False,
    ):
        import ray

        from pipeline.checkpoint import load_generator

        if precision not in ("auto", "fp32", *AUTOCAST_DTYPES):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
        if postprocess not in ("none", "auto", "actor", "writer"):
            raise ValueError(f"postprocess must be none, auto, actor or writer, not {postprocess!r}")
        self.device = resolve_device(device)
        on_gpu = self.device.type == "cuda"
        # On a GPU: bf16 and channels_last unless told otherwise, and the Poisson blend here, batched
        # on the device, rather than OpenCV in the CPU write tasks (which cannot keep up with it).
        if precision == "auto":
            precision = "bf16" if on_gpu else "fp32"
        if channels_last is None:
            channels_last = on_gpu
        self.blend_here = postprocess == "actor" or (postprocess == "auto" and on_gpu)
        self.max_side = max_side
        if num_threads and self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        model, config, self.checkpoint_id = load_generator(
            checkpoint, device=self.device, endpoint_url=endpoint_url
        )
        self.model = model.eval()
        self.channels_last = channels_last
        # The evaluation job scores completions against their inputs: it keeps the "image" column.
        self.keep_images = keep_images
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.mean_pixel = tuple(float(v) for v in config.mean_pixel)
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.worker = ctx.get_actor_id() or ctx.get_worker_id()
        self.gpu_id = ",".join(str(g) for g in ray.get_gpu_ids())
        self.in_actor = ctx.get_actor_id() is not None
        self.batches = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, H, W, 3) and (N, H, W) -> float (N, 3, H, W) in [0, 1] and (N, 1, H, W) on the device,
        reflect-padded to multiples of 4 exactly as ``CompletionNetwork.complete`` would."""
        x = images_to_tensor(images, self.device)
        m = masks_to_tensor(masks, self.device)
        return pad_to_multiple(x, SIZE_MULTIPLE)[0], pad_to_multiple(m, SIZE_MULTIPLE)[0]

    @torch.inference_mode()
    def complete(self, images: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        """Complete images that share one padded size; uint8 in, uint8 out, one forward pass.

        Images of different exact sizes are each padded to the common padded size first, which
        is what ``complete`` would do to each alone, and cropped back after.
        """
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape[:2]].append(i)
        order = [i for idx in by_size.values() for i in idx]
        parts = [
            self._to_device(np.stack([images[i] for i in idx]), np.stack([masks[i] for i in idx]))
            for idx in by_size.values()
        ]
        x = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        m = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            m = m.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.model.complete(x, m, self.mean_pixel)
        if self.blend_here:
            out = poisson_blend(x, out.float(), m)
        out = tensor_to_images(out)
        completed: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        for j, i in enumerate(order):
            h, w = images[i].shape[:2]
            completed[i] = np.ascontiguousarray(out[j, :h, :w])
        return completed

    def _complete_bucket(
        self, images: list[np.ndarray], masks: list[np.ndarray]
    ) -> list[np.ndarray | Exception]:
        """One forward pass for the bucket; if it fails (out of memory, most likely), each image
        alone, so one image the device cannot take becomes an error row instead of failing the
        batch again on every retry."""
        try:
            return list(self.complete(images, masks))
        except Exception:
            if len(images) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        results: list[np.ndarray | Exception] = []
        for image, mask in zip(images, masks, strict=True):
            try:
                results.append(self.complete([image], [mask])[0])
            except Exception as e:
                results.append(e)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.in_actor:
            faults.maybe_crash_inference_actor(self.batches, self.worker)
        n = len(batch["input_key"])
        images = batch["image"] if self.keep_images else batch.pop("image")
        masks = batch["mask"]
        completed = list(images)  # rows with nothing to fill pass their pixels through
        inference_s = np.zeros(n, dtype=np.float32)
        status = batch["status"].astype(object)  # the batch's own arrays may be read-only views
        error_type = batch["error_type"].astype(object)
        error_message = batch["error_message"].astype(object)

        # What the network sees: the image itself, or a copy whose longer side is max_side.
        work: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in range(n):
            if status[i] == STATUS_OK and batch["hole_fraction"][i] > 0:
                work[i] = shrink(images[i], masks[i], self.max_side)
                buckets[padded_size(*work[i][0].shape[:2], SIZE_MULTIPLE)].append(i)
        for idx in buckets.values():
            start = time.perf_counter()
            try:
                outputs = self._complete_bucket([work[i][0] for i in idx], [work[i][1] for i in idx])
            except Exception as e:
                outputs = [e]
            elapsed = (time.perf_counter() - start) / len(idx)
            for i, out in zip(idx, outputs, strict=True):
                inference_s[i] = elapsed
                if isinstance(out, Exception):
                    status[i], error_type[i] = STATUS_ERROR, "inference_failed"
                    error_message[i] = f"{type(out).__name__}: {out}"[:2000]
                    completed[i] = EMPTY_IMAGE
                else:
                    completed[i] = paste(images[i], masks[i], out)
        self.batches += 1

        batch.update(
            status=status,
            error_type=error_type,
            error_message=error_message,
            completed=completed,
            inference_s=inference_s,
            checkpoint_id=np.full(n, self.checkpoint_id, dtype=object),
            node_id=np.full(n, self.node_id, dtype=object),
            inference_worker=np.full(n, self.worker, dtype=object),
            gpu_id=np.full(n, self.gpu_id, dtype=object),
            # The writer post-processes (OpenCV) only what was not blended here.
            blended=np.full(n, self.blend_here, dtype=bool),
        )
        return batch


class ShardInpaintPredictor(InpaintPredictor):
    """``InpaintPredictor`` for sharded inputs: each row is a whole shard (``pipeline/shard_data.py``);
    its samples are completed ``batch_size`` at a time and packed back into the row."""

    def __init__(self, checkpoint: str, *, batch_size: int = 16, **kwargs):
        super().__init__(checkpoint, **kwargs)
        self.batch_size = batch_size

    def complete_shard(self, samples) -> bytes:
        import pyarrow as pa

        from pipeline.shard_data import pack, pixels

        n = len(samples)
        cols = {name: samples.column(name).to_pylist() for name in ("key", "status", "error_type",
                                                                     "error_message", "width", "height")}  # fmt: skip
        hole = samples.column("hole_fraction").to_numpy(zero_copy_only=False)
        raw_images, raw_masks = samples.column("image"), samples.column("mask")
        out = {name: [] for name in ("status", "error_type", "error_message", "completed", "inference_s",
                                     "blended")}  # fmt: skip
        for start in range(0, n, self.batch_size):
            idx = range(start, min(n, start + self.batch_size))
            ok = [cols["status"][i] == STATUS_OK for i in idx]
            shapes = [(cols["height"][i], cols["width"][i]) for i in idx]
            chunk = {
                "input_key": np.array([cols["key"][i] for i in idx], dtype=object),
                "status": np.array([cols["status"][i] for i in idx], dtype=object),
                "error_type": np.array([cols["error_type"][i] for i in idx], dtype=object),
                "error_message": np.array([cols["error_message"][i] for i in idx], dtype=object),
                "hole_fraction": hole[start : start + len(idx)],
                "image": [
                    pixels(raw_images[i].as_buffer(), *shapes[j]) if ok[j] else EMPTY_IMAGE
                    for j, i in enumerate(idx)
                ],
                "mask": [
                    pixels(raw_masks[i].as_buffer(), *shapes[j], channels=1) if ok[j] else EMPTY_IMAGE[..., 0]
                    for j, i in enumerate(idx)
                ],
            }
            result = InpaintPredictor.__call__(self, chunk)
            for j in range(len(idx)):
                out["status"].append(result["status"][j])
                out["error_type"].append(result["error_type"][j])
                out["error_message"].append(result["error_message"][j])
                done = result["completed"][j]
                out["completed"].append(done.tobytes() if result["status"][j] == STATUS_OK else b"")
                out["inference_s"].append(float(result["inference_s"][j]))
                out["blended"].append(bool(result["blended"][j]))
        for name in ("status", "error_type", "error_message"):
            samples = samples.set_column(
                samples.schema.get_field_index(name), name, pa.array(out[name], pa.string())
            )
        samples = samples.drop_columns(["image"]).append_column(
            "completed", pa.array(out["completed"], pa.large_binary())
        )
        samples = samples.append_column("inference_s", pa.array(out["inference_s"], pa.float32()))
        samples = samples.append_column("blended", pa.array(out["blended"], pa.bool_()))
        for name, value in (("checkpoint_id", self.checkpoint_id), ("node_id", self.node_id),
                            ("inference_worker", self.worker), ("gpu_id", self.gpu_id)):  # fmt: skip
            samples = samples.append_column(name, pa.array([value] * n, pa.string()))
        return pack(samples)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.shard_data import unpack

        # (InpaintPredictor.__call__ counts each batch of images and holds the test-only faults.)
        packed = [self.complete_shard(unpack(samples)) for samples in batch["samples"]]
        batch["samples"] = np.array(packed, dtype=object)
        return batch
