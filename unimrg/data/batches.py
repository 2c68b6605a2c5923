"""Typed batches: what a loader yields for one task, and what a model adapter consumes.

Images travel as uint8 at the loader's ``image_size``, generation targets at its ``target_size``
(by default the model's native sizes, e.g. OpenUni's InternViT 448 and SANA 512, through its released
transforms: unimrg/data/transforms.py); each adapter still resizes (a no-op at the native sizes) and
normalises for its own encoders. Generation targets are float in [0, 1] because depth maps are stored at
16 bits and must not be rounded to 8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unimrg.tasks import UND


@dataclass
class UnderstandingBatch:
    """LLaVA-style conversations, about an image or text-only (next-token CE on the assistant turns)."""

    images: torch.Tensor                       # (B, 3, H, W) uint8; zeros where has_image is False
    conversations: list[list[dict[str, str]]]  # per sample: [{"from": "human"|"gpt", "value": str}, ...]
    keys: list[str] = field(default_factory=list)  # sample keys, for error messages
    task: str = UND
    # (B,) bool: False marks a text-only conversation (und_text), which the adapters train without
    # image tokens; None = every sample has its image
    has_image: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def image_mask(self) -> torch.Tensor:
        """(B,) bool, True where the sample has an image."""
        if self.has_image is None:
            return torch.ones(len(self), dtype=torch.bool)
        if self.has_image.shape != (len(self),):
            raise ValueError(f"UnderstandingBatch.has_image has shape {tuple(self.has_image.shape)}, "
                             f"expected ({len(self)},) for {len(self)} samples")
        return self.has_image.bool().cpu()

    def text_only(self) -> int:
        """How many samples are text-only conversations."""
        return int((~self.image_mask()).sum())


@dataclass
class GenerationBatch:
    """Generate ``targets`` from ``images`` (pix: the image itself; depth / seg: its maps)."""

    task: str                    # "pix" | "depth" | "seg"
    images: torch.Tensor         # (B, 3, H, W) uint8, the input (condition) image at model.image_size
    targets: torch.Tensor        # (B, 3, T, T) float32 in [0, 1] at model.target_size, what to generate
                                 # (depth / seg: 3 equal channels)
    prompts: list[str] = field(default_factory=list)  # filled by the objective; "" = unconditional
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.images.shape[0]


TaskBatch = UnderstandingBatch | GenerationBatch
