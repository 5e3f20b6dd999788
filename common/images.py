"""Reading pictures: every file mode as 8-bit RGB, for classification and detection alike."""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import pil_to_tensor

JPEG_START = b"\xff\xd8\xff"  # SOI marker and the first byte of the next marker


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, whatever its mode.

    PIL's `convert("RGB")` clips wide grayscale values at 255, so a 16-bit picture comes out almost white. Integer
    grayscale (modes I;16, I;16B, I;16L: 16-bit PNG, TIFF, PGM; and 32-bit I, which older PIL gives for 16-bit PNGs)
    is taken as 0-65535 and divided by 257, rounded (65535 -> 255, 32896 -> 128); float grayscale (F) as 0-1, times
    255. Values outside the range are clipped and the gray is copied to the three channels. Every other mode (RGB,
    RGBA, L, LA, P, CMYK, ...) goes through `convert("RGB")` as before: PIL itself reads 16-bit colour and 16-bit
    gray + alpha PNGs at 8 bits. Reads the pixels, so an unreadable file raises here (OSError, SyntaxError or
    ValueError, as PIL does)."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.int64).clip(0, 65535)
        gray = (gray + 128) // 257  # round(v / 257); never a tie, as 257 is odd
    elif image.mode == "F":
        gray = np.floor(np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(0, 1) * 255 + 0.5)
    else:
        return image.convert("RGB")
    return Image.fromarray(gray.astype(np.uint8)).convert("RGB")  # [H, W] uint8 -> L -> RGB


def read_rgb(path: str | Path) -> torch.Tensor:
    """uint8 [3, H, W] RGB pixels of the file at `path`, as `to_rgb` gives them, without EXIF rotation.

    A JPEG with one or three channels is decoded by torchvision.io.decode_jpeg, 1.5-2x faster than PIL on this
    project's CPU (`python -m cls.bench --decode`) and pixel for pixel the same (tests/test_cls_data.py); everything
    else goes through PIL and `to_rgb`: other formats, CMYK JPEGs (PIL knows Adobe's inverted CMYK) and the JPEGs
    decode_jpeg rejects (truncated, corrupt, 12-bit), so those fail with PIL's errors (OSError, SyntaxError or
    ValueError), as they did before."""
    data = Path(path).read_bytes()
    if data.startswith(JPEG_START):
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            image = None  # PIL decides, and raises its own error if it cannot read the file either
        if image is not None and image.shape[0] in (1, 3):
            return image.expand(3, -1, -1).contiguous()  # gray copied to the three channels, as convert("RGB")
    with Image.open(io.BytesIO(data)) as f:  # the bytes already read: one read of the file, whatever it holds
        return pil_to_tensor(to_rgb(f))
