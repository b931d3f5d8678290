"""cascade-studio: a Stable Cascade text-to-image studio built on Hugging Face diffusers."""

from ._torchvision import make_importable

make_importable()  # before transformers imports torchvision (see _torchvision.py)

__version__ = "0.1.0"
