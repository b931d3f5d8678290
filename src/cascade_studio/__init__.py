"""cascade-studio: a Stable Cascade text-to-image studio built on Hugging Face diffusers."""

__version__ = "0.1.0"
