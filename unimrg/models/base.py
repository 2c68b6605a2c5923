"""The one protocol every unified multimodal model (UMM) adapter implements.

An adapter is an ``nn.Module`` that DeepSpeed wraps. The trainer only ever calls ``engine(batches)``,
which lands in :meth:`UMMAdapter.forward` and returns one loss per task. Adding a model means writing
one subclass and one line in ``unimrg/models/registry.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from unimrg.data.batches import GenerationBatch, TaskBatch, UnderstandingBatch


@dataclass
class ModelConfig:
    """Fields every adapter understands; adapters extend it with their own architecture fields."""

    name: str = "openuni"
    size: str = "tiny"                 # "tiny" (random init, tests/demo) | "full" (the released architecture)
    checkpoint: str | None = None      # local path to official weights, loaded by ``load_official``
    image_size: int = 56               # side the loaders resize images to (uint8)


class UMMAdapter(nn.Module, abc.ABC):
    """Base class: understanding loss, generation loss, freezing rules, official weights.

    Subclasses set ``config_class`` (their ``*Config``, a ``ModelConfig`` subclass whose defaults
    describe the released architecture) and build themselves in ``__init__(cfg)``: random init at
    ``cfg.size`` ("tiny" or "full"). ``with torch.device("meta"): Adapter(cfg)`` must work at full size.
    Each adapter owns its tokenizer (built in code at tiny size, loaded from a local folder otherwise).
    """

    config_class: type[ModelConfig] = ModelConfig
    #: the override that gives a full-size model its tokenizer (named in the error when it is missing)
    tokenizer_setting: str = "model.tokenizer=<local tokenizer folder>"
    tokenizer = None

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__}(size='full') needs its tokenizer: set {self.tokenizer_setting}")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own BOS/EOS (chat formats add their own)."""
        return self._tok()(text, add_special_tokens=False).input_ids

    # ---- the losses --------------------------------------------------------------------------
    @abc.abstractmethod
    def understanding_loss(self, batch: UnderstandingBatch) -> torch.Tensor:
        """Next-token cross-entropy on the assistant turns, conditioned on the image."""

    @abc.abstractmethod
    def generation_loss(self, batch: GenerationBatch) -> torch.Tensor:
        """The model's own generative loss for ``batch.targets``, conditioned on the input image's
        understanding features and ``batch.prompts``."""

    def forward(self, batches: Sequence[TaskBatch]) -> dict[str, torch.Tensor]:
        """One micro-step: a loss per task. Round-robin passes one batch; the joint schedule passes
        one per task. Adapters that must see every task in a single pass (Show-o) override this."""
        losses = {}
        for b in batches:
            if isinstance(b, UnderstandingBatch):
                losses[b.task] = self.understanding_loss(b)
            else:
                losses[b.task] = self.generation_loss(b)
        return losses

    # ---- freezing ----------------------------------------------------------------------------
    @abc.abstractmethod
    def frozen_module_names(self) -> list[str]:
        """Top-level attribute paths frozen by the paper's rule (VAE / VQ tokenizer, understanding
        encoder unless it is shared with generation)."""

    def apply_freezing(self, extra_frozen: Sequence[str] = ()) -> None:
        """Freeze the paper's modules plus ``extra_frozen`` (e.g. OpenUni's stage 2 freezes the
        understanding model). Frozen modules are put in eval mode by :meth:`train`."""
        for name in [*self.frozen_module_names(), *extra_frozen]:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)

    def understanding_module_names(self) -> list[str]:
        """The understanding model (a recipe stage may freeze it: ``freeze: [understanding]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its understanding modules; list "
                                  "module paths in train.stages[].freeze instead of 'understanding'")

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Parameters AdamW must not decay. Default none (the xtuner / mmengine default the OpenUni
        and Show-o releases train with); adapters whose official optimizer excludes some override."""
        return False

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups over the trainable parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if self.no_weight_decay(name, p) else decay).append(p)
        return [g for g in ({"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts never train: keep dropout / norm statistics of e.g. the VAE deterministic.
        for name in self.frozen_module_names():
            self.get_submodule(name).eval()
        return self

    # ---- inference ---------------------------------------------------------------------------
    @abc.abstractmethod
    def answer(self, images: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32, *,
               early_stop: bool = True) -> list[str]:
        """Greedy (arg-max) answers, one per (uint8 (B, 3, H, W) image, question) pair, through the
        model's understanding path and chat format; batched, deterministic (no sampling), eval mode.
        ``early_stop=False`` always runs ``max_new_tokens`` forwards (ZeRO-3 ranks stay in step)."""

    # ---- weights -----------------------------------------------------------------------------
    def load_official(self, path: str) -> None:
        """Load the released checkpoint from a local path; report missing / unexpected keys by name."""
        raise NotImplementedError(f"{type(self).__name__} cannot load official weights yet")
