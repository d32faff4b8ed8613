"""Decoding clinic images: one place that turns any file a clinic exports into RGB pixels.

Every later stage (validation, the decode cache, inference) decodes through here, so an
image that validates is decoded the same way for training and for prediction. Grayscale,
RGBA, palette, CMYK and 16-bit images are converted to 8-bit RGB; EXIF orientation is
applied because phone and camera exports often store rotated pixels.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail loudly, never decode to a half-grey image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)

#: Which extensions each decoder format may carry; anything else is a wrong extension.
_FORMAT_EXTENSIONS: dict[str, frozenset[str]] = {
    "JPEG": frozenset({".jpg", ".jpeg", ".jpe", ".jfif"}),
    "PNG": frozenset({".png"}),
    "BMP": frozenset({".bmp"}),
    "TIFF": frozenset({".tif", ".tiff"}),
    "WEBP": frozenset({".webp"}),
    "GIF": frozenset({".gif"}),
    "MPO": frozenset({".jpg", ".jpeg", ".mpo"}),  # some cameras write JPEG as MPO
}

#: Images above this many pixels are refused (decompression-bomb guard, ~ 12k x 12k).
MAX_PIXELS = 150_000_000


class ImageDecodeError(Exception):
    """An image file cannot be decoded; ``kind`` is a problem kind of the validation report."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def content_hash(data: bytes) -> str:
    """Hash of a file's bytes: the identity of an image for duplicates and the decode cache."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, scaling 16/32-bit data instead of clipping it."""
    if img.mode == "RGB":
        return img
    if img.mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry no lesion; composite them on black like an unlit border.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageInfo:
    """What decoding one file found: identity, format and the problem if any."""

    hash: str
    n_bytes: int
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    problem: str | None = None  # a problem kind; None when the image decoded
    detail: str = ""
    extension_ok: bool = True
    frames: int = 1  # animated GIF/TIFF stacks: only the first frame is used


def _open(data: bytes, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode bytes, mapping every failure to an ImageDecodeError."""
    if not data:
        raise ImageDecodeError("zero_byte", "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise ImageDecodeError(
                    "unreadable", f"image is {img.width}x{img.height}, above the {MAX_PIXELS:,}-pixel limit"
                )
            if draft is not None and img.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale: much faster for big clinic photos.
                img.draft("RGB", draft)
            img.load()
            return img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not_image", "not an image file (no decoder recognises it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("unreadable", f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc)
        kind = "truncated" if "truncat" in message.lower() or isinstance(exc, EOFError) else "unreadable"
        raise ImageDecodeError(kind, f"cannot decode image: {message}") from None


def inspect_file(path: str | Path) -> ImageInfo:
    """Read a file once, hash it and decode it fully; never raises for a bad image."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ImageInfo(hash="", n_bytes=0, problem="unreadable", detail=f"cannot read file: {exc}")
    digest = content_hash(data)
    try:
        img = _open(data)
    except ImageDecodeError as exc:
        return ImageInfo(hash=digest, n_bytes=len(data), problem=exc.kind, detail=exc.detail)
    fmt = img.format or ""
    allowed = _FORMAT_EXTENSIONS.get(fmt)
    return ImageInfo(
        hash=digest,
        n_bytes=len(data),
        format=fmt,
        mode=img.mode,
        width=img.width,
        height=img.height,
        extension_ok=allowed is None or path.suffix.lower() in allowed,
        frames=int(getattr(img, "n_frames", 1) or 1),
    )


def load_rgb(source: str | Path | bytes, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode a file (or its bytes) to an upright 8-bit RGB image.

    Raises ImageDecodeError (with the file name in the message) when it cannot.
    """
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    else:
        name = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageDecodeError("unreadable", f"{name}: cannot read file: {exc}") from None
    try:
        img = _open(data, draft=draft)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.kind, f"{name}: {exc.detail}") from None
    return to_rgb(ImageOps.exif_transpose(img))


def fit_to_size(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to cover ``size`` (width, height) keeping the aspect ratio, then centre-crop.

    Returns a (height, width, 3) uint8 array. Keeping the aspect ratio matters: squeezing a
    round lesion into an oval changes the very shape cues a dermatologist reads.
    """
    width, height = size
    # Pillow's resize filters are antialiased, so BILINEAR downscaling does not alias.
    return np.array(ImageOps.fit(img, (width, height), method=Image.Resampling.BILINEAR))  # writable copy


COLOUR_CONSTANCY = ("none", "shades-of-gray")


def shades_of_gray(image: np.ndarray, *, p: int = 6) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson and Trezzi 2004) on an (H, W, 3) uint8 array.

    Dermatoscopes and their lighting tint images differently from clinic to clinic; dividing
    each channel by its Minkowski p-norm estimate of the illuminant (p = 6, as Barata et al.
    2015 chose for dermoscopy) maps every image to a common neutral light. The same function
    runs at training and at inference, so a model never sees a colour space it was not trained on.

    Computed from per-channel histograms: a uint8 image has 256 levels a channel, so the
    Minkowski mean is each channel's 256-bin count times a table of level**p, summed in
    float64 (exact counts, no float32 accumulation over the pixels), and the correction is a
    per-channel lookup table (OpenCV's calcHist and LUT). At 128x96 this takes a third to a
    quarter of the time of the per-pixel float32 version it replaced, whose rounded float32
    sum moved 0.02 % of pixels by one level against this one; and it is independent of pixel
    order, so a flipped image gets exactly the flipped correction.
    """
    import cv2  # opencv-python-headless, albumentations' own image library

    x = np.asarray(image)
    if x.dtype != np.uint8:
        x = np.clip(x, 0, 255).astype(np.uint8)
    x = np.ascontiguousarray(x)
    # calcHist counts in float32: exact up to 2**24 pixels, far above any model's input size.
    counts = np.stack([cv2.calcHist([x], [c], None, [256], [0, 256]).ravel() for c in range(3)]).astype(np.float64)
    illuminant = (counts @ _LEVELS**p / (x.shape[0] * x.shape[1])) ** (1.0 / p)  # per channel
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm <= 0 or not np.all(illuminant > 0):
        return x.copy()  # a black or single-channel image: nothing to estimate
    gains = norm / (illuminant * np.sqrt(3.0))  # a neutral (grey) illuminant gives gains of 1
    table = np.clip(np.outer(_LEVELS, gains) + 0.5, 0, 255).astype(np.uint8)  # (256, 3): level -> level per channel
    return cv2.LUT(x, table.reshape(256, 1, 3))


_LEVELS = np.arange(256, dtype=np.float64)


def apply_colour(image: np.ndarray, method: str | None) -> np.ndarray:
    """The bundle's colour step (``none`` / ``shades-of-gray``) on an (H, W, 3) uint8 array."""
    if method in (None, "none"):
        return image
    if method == "shades-of-gray":
        return shades_of_gray(image)
    raise ValueError(f"unknown colour constancy {method!r}; choose one of {', '.join(COLOUR_CONSTANCY)}")
