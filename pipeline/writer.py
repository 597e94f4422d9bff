"""Post-processing, encoding and atomic writes of completed images: the EncodeWrite stage.

Runs as plain Ray Data tasks after the inference actors, so the GPU never waits on PNG/JPEG
encoding or on object storage. Each object appears whole or not at all
(``storage.atomic_write_bytes``); a row says ``ok`` only once its object is written.

Output names are a pure function of the input key and the output format (``output_key_for``), so
reruns and resumes land on the same keys and the manifest maps inputs to outputs one to one.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.manifest import STATUS_ERROR, STATUS_OK
from pipeline.metrics import RowTally
from pipeline.naming import mask_output_key_for

JPEG_QUALITY = 95
PNG_COMPRESSION = 3  # zlib level: most of level 9's size at a fraction of its time
WEBP_QUALITY = 95
OPENCV_ENCODERS = {
    "png": (".png", [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]),
    "jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]),
    "webp": (".webp", [cv2.IMWRITE_WEBP_QUALITY, WEBP_QUALITY]),
}


# Encoders whose files hold every 8-bit pixel exactly / that can hold an alpha channel.
LOSSLESS_ENCODERS = ("png", "tiff", "bmp")
ALPHA_ENCODERS = ("png", "tiff", "webp")
PILLOW_OPTIONS = {"jpeg": {"quality": JPEG_QUALITY}, "webp": {"quality": WEBP_QUALITY},
                  "png": {"compress_level": PNG_COMPRESSION}}  # fmt: skip


def encode(
    image: np.ndarray, encoder: str, alpha: np.ndarray | None = None, icc_profile: bytes | None = None
) -> bytes:
    """HxWx3 RGB (or HxW grey) uint8 -> file bytes; with ``alpha`` (HxW uint8) an RGBA file where
    the format holds one (``ALPHA_ENCODERS``; a JPEG drops it), with ``icc_profile`` that profile
    embedded. Those go through Pillow; the rest through OpenCV, about twice as fast."""
    if alpha is not None and alpha.size and encoder in ALPHA_ENCODERS:
        image = np.dstack([image, alpha])
    elif alpha is None or not alpha.size:
        alpha = None
    if alpha is not None or icc_profile:
        sink = io.BytesIO()
        options = dict(
            PILLOW_OPTIONS.get(encoder, {}), **({"icc_profile": icc_profile} if icc_profile else {})
        )
        Image.fromarray(image).save(sink, format=encoder.upper(), **options)
        return sink.getvalue()
    if encoder in OPENCV_ENCODERS:
        suffix, params = OPENCV_ENCODERS[encoder]
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(suffix, bgr, params)
        if not ok:
            raise ValueError(f"OpenCV could not encode a {image.shape} image as {encoder}")
        return buf.tobytes()
    sink = io.BytesIO()
    Image.fromarray(image).save(sink, format=encoder.upper())
    return sink.getvalue()


@dataclass(frozen=True)
class WriteOptions:
    output: str
    postprocess: bool = True
    write_masks: bool = False
    endpoint_url: str | None = None
    run_id: str = ""  # labels the live figures (pipeline.metrics)


def postprocessed(completed: np.ndarray, mask: np.ndarray, postprocess: bool) -> np.ndarray:
    """The paper's post-processing of a completion (OpenCV, in the CPU write tasks), or the
    completion as it is when ``postprocess`` is off or there is no hole."""
    if not postprocess or not mask.any():
        return completed
    from model.postprocess import blend

    # ``completed`` already holds the known pixels bit for bit (model.completion.composite), so it
    # serves as both the image and the completion.
    return blend(completed, completed, mask)


def encode_write(batch: dict[str, np.ndarray], *, options: WriteOptions) -> dict[str, np.ndarray]:
    """EncodeWrite stage: write every ``ok`` row's output; return the rows without pixels."""
    fs, root = storage.filesystem(options.output, options.endpoint_url)
    n = len(batch["input_key"])
    status = batch["status"].astype(object)
    error_type = batch["error_type"].astype(object)
    error_message = batch["error_message"].astype(object)
    output_key = batch["output_key"].astype(object)
    mask_output_key = np.full(n, "", dtype=object)
    output_uri = np.full(n, "", dtype=object)
    exact = np.zeros(n, dtype=bool)
    write_s = np.zeros(n, dtype=np.float32)
    tally = RowTally(options.run_id)  # counts each image as it is done, not when the task ends
    for i in range(n):
        if output_key[i] and status[i] != STATUS_ERROR:
            output_uri[i] = storage.full_uri(fs, storage.join_key(root, output_key[i]))
        if status[i] != STATUS_OK:
            tally.row(batch, i, status[i], error_type[i])
            continue
        start = time.perf_counter()
        try:
            mask = batch["mask"][i]
            blended = "blended" in batch and bool(batch["blended"][i])
            final = postprocessed(batch["completed"][i], mask, options.postprocess and not blended)
            encoder = batch["encoder"][i]
            alpha = batch["alpha"][i] if "alpha" in batch else None
            has_alpha = alpha is not None and alpha.size > 0
            profile = bytes(batch["icc_profile"][i]) if "icc_profile" in batch else b""
            data = encode(final, encoder, alpha if has_alpha else None, profile or None)
            # Known pixels come back bit for bit only from an 8-bit source into a lossless file
            # that also holds its alpha (post-processing changes the hole alone).
            exact[i] = (
                (bool(batch["source_exact"][i]) if "source_exact" in batch else False)
                and encoder in LOSSLESS_ENCODERS
                and (not has_alpha or encoder in ALPHA_ENCODERS)
            )
            path = storage.join_key(root, output_key[i])
            if options.write_masks:
                mask_key = mask_output_key_for(output_key[i])
                mask_data = encode((mask * 255).astype(np.uint8), "png")
                mask_path = storage.join_key(root, mask_key)
                storage.with_retries(lambda p=mask_path, d=mask_data: storage.atomic_write_bytes(fs, p, d))
                mask_output_key[i] = mask_key
            # The image last: its presence (and the ok row) implies the mask is there too.
            storage.with_retries(lambda p=path, d=data: storage.atomic_write_bytes(fs, p, d))
        except Exception as e:
            status[i] = STATUS_ERROR
            error_type[i] = "write_failed"
            error_message[i] = f"{type(e).__name__}: {e}"
            output_key[i] = output_uri[i] = mask_output_key[i] = ""
        write_s[i] = time.perf_counter() - start
        tally.row(batch, i, status[i], error_type[i], float(write_s[i]))
    tally.push()
    dropped = ("completed", "mask", "encoder", "blended", "alpha", "icc_profile", "source_exact")
    out = {k: v for k, v in batch.items() if k not in dropped}
    out.update(
        status=status,
        error_type=error_type,
        error_message=error_message,
        output_key=output_key,
        output_uri=output_uri,
        mask_output_key=mask_output_key,
        known_pixels_exact=exact,
        write_s=write_s,
    )
    return out
