"""python -m unimrg.eval.export --model openuni --state-dict RUN/final/model.pt --out DIR [model.key=value ...]

Export trained weights for the tools people already use: the adapter's ``export_official(DIR)`` (for
OpenUni: ``openuni.pth`` with exactly the release file's keys -- queries, connector, projector, SANA --,
``internvl_hf/`` as a self-contained transformers folder (tokenizer, image processor), and
``internvl_original/`` when ``model.internvl_path`` is an original-layout folder; ``model.variant`` picks
B-512 / L-512 / L-1024; Harmon: ``harmon_1.5b.pth``; Show-o: ``showo/``, ``magvitv2/``, ``clip-vit/``, each
with its config).

``--state-dict`` holds the adapter's own keys: the trainer's consolidated ``RUN/final/model.pt`` (or
``RUN/export/stageN/model.pt``), or any state dict saved with ``torch.save`` (a ``module.`` prefix is
removed; either name of a tied weight is enough). The ``model.*`` overrides describe the architecture
and where the tokenizer / original folders are.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    from omegaconf import OmegaConf

    from unimrg.models import registry
    from unimrg.models.official_io import load_adapter_state, read_state_dict
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=registry.names())
    ap.add_argument("--state-dict", required=True, help="adapter-layout weights (.pt/.pth/.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="model.key=value")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if not o.startswith("model.") or "=" not in o]
    if bad:
        ap.error(f"overrides must look like model.key=value: {bad}")
    cls = registry.adapter_class(args.model)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.config_class(name=args.model)),
                                              OmegaConf.from_dotlist([o[len("model."):] for o in args.overrides])))
    model = cls(cfg)  # random init, replaced entirely below
    load_adapter_state(model, read_state_dict(args.state_dict, "--state-dict"), f"--state-dict {args.state_dict}")
    paths = model.export_official(args.out)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


if __name__ == "__main__":
    main()
