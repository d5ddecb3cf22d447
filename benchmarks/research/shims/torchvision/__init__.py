"""Tiny stand-in for torchvision (not installed): only what timm's layer imports need."""
__version__ = "0.0-shim"
from torchvision import datasets, ops, transforms, utils  # noqa: E402,F401
