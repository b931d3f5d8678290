"""The official Stable Cascade weights: which repo and subfolder holds each component of a preset.

Which files of a subfolder are needed is not listed here: `files.py` chooses them from what the repo (or the disk)
actually holds, so a sharded or fp32-only component is found the same way as a single bf16 file.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_REPO = "stabilityai/stable-cascade-prior"
DECODER_REPO = "stabilityai/stable-cascade"
REPOS = (PRIOR_REPO, DECODER_REPO)

# Approximate bf16 download sizes in GB (parameter count x 2 bytes), for messages before the Hub is asked.
APPROX_GB = {
    "prior": 7.2,
    "prior_lite": 2.0,
    "decoder": 3.1,
    "decoder_lite": 1.4,
    "text_encoder": 1.4,
    "vqgan": 0.074,  # fp32: no public source shows a bf16 file of Stage A
    "tokenizer": 0.004,
    "scheduler": 0.0,
    "image_encoder": 1.2,  # CLIP ViT-L/14 vision tower, fp32
    "feature_extractor": 0.0,
}
ROLES = ("prior", "decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")
# Single files a preset's download fetches beside its components (what image-to-image and LoRA training need):
# Stability's EfficientNet image encoder, about 80 MB. Text-to-image works without it.
EXTRA_FILES = {DECODER_REPO: ("effnet_encoder.safetensors",)}
IMAGE_PROMPT_ROLES = ("image_encoder", "feature_extractor")  # `download --with-image-prompts`


@dataclass(frozen=True)
class ModelPreset:
    """One downloadable combination of the official weights."""

    name: str
    prior_subfolder: str
    decoder_subfolder: str
    variant: str = "bf16"

    @property
    def display_name(self) -> str:
        return f"stable-cascade-{self.name}"

    def components(self, image_prompts: bool = False) -> dict[str, tuple[str, str]]:
        """role -> (repo, subfolder). The decoder repo's text encoder is the same model as the prior repo's, so it
        is fetched once, from the decoder repo, and shared by both pipelines."""
        out = {
            "prior": (PRIOR_REPO, self.prior_subfolder),
            "decoder": (DECODER_REPO, self.decoder_subfolder),
            "vqgan": (DECODER_REPO, "vqgan"),
            "text_encoder": (DECODER_REPO, "text_encoder"),
            "tokenizer": (DECODER_REPO, "tokenizer"),
            "scheduler": (DECODER_REPO, "scheduler"),
        }
        if image_prompts:
            out |= {role: (PRIOR_REPO, role) for role in IMAGE_PROMPT_ROLES}
        return out

    def by_repo(self, image_prompts: bool = False) -> dict[str, dict[str, str]]:
        """repo -> subfolder -> role."""
        out: dict[str, dict[str, str]] = {}
        for role, (repo, sub) in self.components(image_prompts).items():
            out.setdefault(repo, {})[sub] = role
        return out

    def approx_gb(self, image_prompts: bool = False) -> float:
        return sum(APPROX_GB[sub] for _, sub in self.components(image_prompts).values())


PRESETS: dict[str, ModelPreset] = {
    "full": ModelPreset("full", prior_subfolder="prior", decoder_subfolder="decoder"),
    "lite": ModelPreset("lite", prior_subfolder="prior_lite", decoder_subfolder="decoder_lite"),
}
