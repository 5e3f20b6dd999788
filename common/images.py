"""Reading pictures: every file mode as 8-bit RGB, for classification and detection alike."""
import numpy as np
from PIL import Image


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
