"""The one protocol every unified multimodal model (UMM) adapter implements.

An adapter is an ``nn.Module`` that DeepSpeed wraps. The trainer only ever calls ``engine(batches)``,
which lands in :meth:`UMMAdapter.forward` and returns one loss per task. Adding a model means writing
one subclass and one line in ``unimrg/models/registry.py``.

Besides the losses every adapter implements ``load_official(path) -> LoadReport`` (the released files,
checked: a full-size load that leaves parameters unloaded is an error naming the keys and the field that
provides them), ``export_official(dir) -> dict[str, Path]`` (the released layouts) and
``sample(images, prompts, seed=...)`` (generation, the same output for the same seed) and
``image_transforms(cfg)`` (its released image preprocessing, applied by the loaders);
``tests/unit/test_adapter_protocol.py`` checks all of it for every registered model.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unimrg.data.batches import GenerationBatch, TaskBatch, UnderstandingBatch
from unimrg.data.transforms import STRETCH_ALL, ImageTransforms
from unimrg.models.official_io import LoadReport, check_report


@dataclass
class ModelConfig:
    """Fields every adapter understands; adapters extend it with their own architecture fields."""

    name: str = "openuni"
    size: str = "tiny"                 # "tiny" (random init, tests/demo) | "full" (the released architecture)
    checkpoint: str | None = None      # local path to official weights, loaded by ``load_official``
    init: str = "official"             # "official": full size needs model.checkpoint; "random": no weights, on purpose
    # "tiny": start from the in-house tiny base (unimrg/pretrain.py; submit.py fills the weight fields with
    # its cache entry, building it if missing); "" / "none": random init (tests set UNIMRG_BASE=none)
    base: str = ""
    # Resolutions the loaders deliver; 0 = the adapter's native one (its released checkpoint's, see
    # ``UMMAdapter.native_resolution``), filled in by ``resolve_resolution`` when the config is loaded.
    image_size: int = 0                # input images (understanding + generation condition), uint8
    target_size: int = 0               # generation targets (pix / depth / seg), float
    # A full-size run whose sizes differ from the native ones is refused unless this is true.
    non_native_resolution: bool = False
    # How the loaders bring images and targets to those sizes: "release" = the adapter's released
    # transforms (``UMMAdapter.image_transforms``: pad / crop / filters as the official code), "stretch" =
    # every image and target stretched to a square (bicubic; this project's earlier behaviour).
    preprocessing: str = "release"
    # Paper-shape smoke runs only (tests/integration/test_paper_shapes.py): the full architecture's
    # resolutions, token counts, vocabulary and latent grids with 1-2 layers per stack and narrow widths.
    smoke: bool = False
    # fnmatch patterns of adapter keys a load may leave unloaded / file keys it may drop (deliberate
    # partial loads); without them a full-size load that misses anything is an error.
    allow_missing: list[str] = field(default_factory=list)
    allow_unexpected: list[str] = field(default_factory=list)


@dataclass
class Resolution:
    """Sides in pixels: what the understanding encoder reads and what the generator produces."""

    image: int
    target: int


class UMMAdapter(nn.Module, abc.ABC):
    """Base class: understanding loss, generation loss, freezing rules, official weights.

    Subclasses set ``config_class`` (their ``*Config``, a ``ModelConfig`` subclass whose defaults
    describe the released architecture) and build themselves in ``__init__(cfg)``: random init at
    ``cfg.size`` ("tiny" or "full"). ``with torch.device("meta"): Adapter(cfg)`` must work at full size.
    Each adapter owns its tokenizer (built in code at tiny size, loaded from a local folder otherwise).
    """

    config_class: type[ModelConfig] = ModelConfig
    cfg: ModelConfig
    #: config fields naming official weights → the adapter-key prefixes each provides ("" = everything).
    #: build_model loads when any is set; a load error names the field for the keys it left missing.
    official_sources: Mapping[str, tuple[str, ...]] = {"checkpoint": ("",)}
    #: the override that gives a full-size model its tokenizer (named in the error when it is missing)
    tokenizer_setting: str = "model.tokenizer=<local tokenizer folder>"

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for a sampler or answer pass, the previous mode restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)
    tokenizer = None

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__}(size='full') needs its tokenizer: set {self.tokenizer_setting}")
        return self.tokenizer

    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the tokenizer's own BOS/EOS (chat formats add their own)."""
        return self._tok()(text, add_special_tokens=False).input_ids

    # ---- shapes --------------------------------------------------------------------------------
    @classmethod
    def native_resolution(cls, cfg: ModelConfig) -> Resolution:
        """The resolution of the released checkpoint at ``cfg.size`` (understanding input, generation
        target). Each adapter cites where its numbers come from."""
        raise NotImplementedError(f"{cls.__name__} does not declare its native resolution")

    @classmethod
    def resolve_resolution(cls, cfg: ModelConfig) -> Resolution:
        """The sizes a run uses: ``cfg.image_size`` / ``cfg.target_size``, or the native ones where 0."""
        native = cls.native_resolution(cfg)
        return Resolution(cfg.image_size or native.image, cfg.target_size or native.target)

    #: the released image transforms, built from unimrg/data/transforms.py (numpy / PIL / torch only, so
    #: the loaders and their workers use them without transformers / diffusers); every adapter declares
    #: its own, citing the official code (tests/unit/test_adapter_protocol.py checks that each does)
    release_transforms: ImageTransforms | None = None

    @classmethod
    def image_transforms(cls, cfg: ModelConfig) -> ImageTransforms:
        """What the loaders apply to understanding images, generation conditions and targets
        (``model.preprocessing``: "release" = :attr:`release_transforms`, "stretch" = squares stretched;
        an adapter that declares none gets the stretch)."""
        if cfg.preprocessing not in ("release", "stretch"):
            raise ValueError(f"model.preprocessing={cfg.preprocessing!r}: choose 'release' (the released "
                             "model's image transforms) or 'stretch' (every image stretched to a square)")
        if cfg.preprocessing == "stretch" or cls.release_transforms is None:
            return STRETCH_ALL
        return cls.release_transforms

    @classmethod
    def sequence_plan(cls, cfg: ModelConfig, task: str) -> dict[str, int]:
        """Per-sample token counts of ``task`` at ``cfg``'s resolution (upper bounds where text is
        truncated), e.g. ``{"image tokens": 256, "sequence ≤": 2048}``; printed by ``--dry-run``."""
        return {}

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
        self._frozen_names = list(dict.fromkeys([*self.frozen_module_names(), *extra_frozen]))
        for name in self._frozen_names:
            for p in self.get_submodule(name).parameters():
                p.requires_grad_(False)
        self.train(self.training)

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
        # Frozen parts never train (the paper's rule and a recipe stage's extra ones): keep dropout / norm
        # statistics of e.g. the VAE deterministic.
        for name in getattr(self, "_frozen_names", None) or self.frozen_module_names():
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
    def has_official_weights(self) -> bool:
        """Is any of ``official_sources`` set (then ``build_model`` calls :meth:`load_official`)?"""
        return any(getattr(self.cfg, f, None) for f in self.official_sources)

    @abc.abstractmethod
    def load_official(self, path: str | None = None, *, allow_missing: Sequence[str] = ()) -> LoadReport:
        """Load the released checkpoint ``path`` (``cfg.checkpoint``) and the other ``official_sources``
        fields that are set; return one :class:`LoadReport` (loaded / missing / unexpected / ignored by
        name). Implementations end with :meth:`check_load`."""

    def check_load(self, report: LoadReport, allow_missing: Sequence[str] = (), strict: bool | None = None
                   ) -> LoadReport:
        """At full size a load must leave no parameter unloaded and no file key unplaced, except what
        ``allow_missing`` / ``cfg.allow_missing`` (and ``cfg.allow_unexpected``) allow; the error names the
        keys, the config field that provides them and the override. Tiny models only log (``strict``
        True: refuse at any size)."""
        strict = self.cfg.size == "full" if strict is None else strict
        return check_report(report, self.official_sources, strict=strict,
                            allow_missing=[*self.cfg.allow_missing, *allow_missing],
                            allow_unexpected=self.cfg.allow_unexpected)

    @abc.abstractmethod
    def export_official(self, out_dir: str | Path) -> dict[str, Path]:
        """Write this model's weights in the released layouts under ``out_dir``; returns what was written
        (component → file or folder). Every trained parameter must be in it."""

    def export_sources(self, paths: Mapping[str, Path]) -> dict[str, str]:
        """Config fields (``official_sources``) that load back what :meth:`export_official` wrote."""
        return {"checkpoint": str(next(iter(paths.values())))}

    @abc.abstractmethod
    def sample(self, images: torch.Tensor, prompts: Sequence[str], *, seed: int = 0, **opts) -> torch.Tensor:
        """Generate float images (B, 3, S, S) in [0, 1] for (uint8 image, prompt) pairs; the same seed gives
        the same images. ``opts`` are the model's own sampler settings."""
