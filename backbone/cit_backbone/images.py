"""Decoding untrusted image bytes, and the vision tower's preprocessing. No torch import here."""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_SIZE = 224  # EfficientNet-Lite0's native resolution: a 7x7 feature map
MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
# The openers tried, by name: nothing else parses the bytes. A JPEG with a multi-picture extension (what phone
# cameras write) opens as MPO; its first picture is the photo.
OPENERS = ["PNG", "JPEG"]
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO")
MAX_FRAMES = 64  # animated PNGs and MPOs: the first frame is used; files claiming more frames are refused


class InvalidImage(ValueError):
    """The bytes are not an image this service accepts; the message says why."""


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode PNG/JPEG bytes into an RGB image, upright as its EXIF orientation says (phone photos), refusing
    empty, oversized, truncated or bomb-like input. Of an animated or multi-picture file, the first frame."""
    if not data:
        raise InvalidImage("image is empty")
    if len(data) > max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=OPENERS)
            except Image.UnidentifiedImageError:
                raise InvalidImage("image could not be decoded as PNG or JPEG (the formats accepted)") from None
            if img.format not in ACCEPTED_FORMATS:
                raise InvalidImage(f"image format {img.format} is not accepted; send PNG or JPEG")
            # The header's size is checked before any pixel is decoded, so a bomb costs nothing.
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidImage(f"image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            frames = getattr(img, "n_frames", 1)
            if frames > MAX_FRAMES:
                raise InvalidImage(f"image has {frames} frames; the limit is {MAX_FRAMES} (the first one is used)")
            img.load()  # the first frame only
            upright = ImageOps.exif_transpose(img)  # a rotated copy when the EXIF orientation asks for one
            return upright.convert("RGB")
    except InvalidImage:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises a zoo of types for broken files
        raise InvalidImage(f"image could not be decoded: {exc}") from None


def preprocess(images: list[Image.Image]) -> np.ndarray:
    """RGB images -> float32 array [B, 3, 224, 224], TF-style scaling (x - 127) / 128 of EfficientNet-Lite."""
    arrays = [
        np.asarray(img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
        for img in images
    ]
    batch = (np.stack(arrays) - 127.0) / 128.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
