"""Images that installed packages already carry (no downloads): scikit-image's ``skimage/data`` and matplotlib's
``sample_data``. A source is named ``"<package>:<file>"``, e.g. ``"skimage:astronaut.png"``."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

__all__ = ["ImageSourceError", "image_path", "load_image"]

# package -> folder inside the installed package that holds the sample images
_FOLDERS = {"skimage": ("skimage", "data"), "matplotlib": ("matplotlib", "mpl-data", "sample_data")}


class ImageSourceError(ValueError):
    """An image source is malformed, or its package / file is not installed."""


def image_path(source: str) -> Path:
    """Resolve ``"<package>:<file>"`` to the file inside the installed package (without importing the package)."""
    package, sep, name = source.partition(":")
    if not sep or package not in _FOLDERS or not name:
        raise ImageSourceError(f"image source {source!r}: expected '<package>:<file>' with package in "
                               f"{sorted(_FOLDERS)}")
    root, *sub = _FOLDERS[package]
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        raise ImageSourceError(f"image source {source!r}: package {root!r} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*sub, name)
    if not path.is_file():
        raise ImageSourceError(f"image source {source!r}: {path} does not exist")
    return path


def load_image(source: str) -> Image.Image:
    """Load an image source as RGB (grey images are expanded, alpha is dropped)."""
    with Image.open(image_path(source)) as im:
        return im.convert("RGB")
