"""The official Stable Cascade weights: which repos, subfolders and files each preset needs."""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_REPO = "stabilityai/stable-cascade-prior"
DECODER_REPO = "stabilityai/stable-cascade"

# Components every preset needs from the decoder repo, beside the decoder itself.
SHARED_COMPONENTS = ("vqgan", "text_encoder", "tokenizer", "scheduler")

# Approximate bf16 download sizes in GB (parameter count x 2 bytes), for the missing-weights message.
APPROX_GB = {
    "prior": 7.2,
    "prior_lite": 2.0,
    "decoder": 3.1,
    "decoder_lite": 1.4,
    "text_encoder": 1.4,
    "vqgan": 0.04,
    "tokenizer": 0.004,
    "scheduler": 0.0,
}


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

    def files_by_repo(self) -> dict[str, dict[str, list[str]]]:
        """repo -> subfolder -> glob patterns of the files this preset needs (and no others).

        The repos also hold fp32 weights, the other preset and original-format checkpoints; downloading only
        these patterns keeps `full` near 12 GB and `lite` near 5 GB instead of the repos' ~100 GB.
        """
        return {
            PRIOR_REPO: {self.prior_subfolder: self._weight_patterns(self.prior_subfolder)},
            DECODER_REPO: {
                self.decoder_subfolder: self._weight_patterns(self.decoder_subfolder),
                "vqgan": self._weight_patterns("vqgan"),
                "text_encoder": self._weight_patterns("text_encoder"),
                "tokenizer": ["tokenizer/*.json", "tokenizer/*.txt"],
                "scheduler": ["scheduler/*.json"],
            },
        }

    def _weight_patterns(self, subfolder: str) -> list[str]:
        return [f"{subfolder}/*.json", f"{subfolder}/*.{self.variant}.safetensors"]

    def approx_gb(self) -> float:
        return sum(APPROX_GB[sub] for subs in self.files_by_repo().values() for sub in subs)


PRESETS: dict[str, ModelPreset] = {
    "full": ModelPreset("full", prior_subfolder="prior", decoder_subfolder="decoder"),
    "lite": ModelPreset("lite", prior_subfolder="prior_lite", decoder_subfolder="decoder_lite"),
}
