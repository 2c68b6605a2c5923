"""python -m unimrg.eval.export --model openuni --state-dict FILE --out DIR [model.key=value ...]

Export trained weights for the tools people already use: the adapter's ``export_official(DIR)`` (for
OpenUni: ``openuni.pth`` in the release layout, ``internvl_hf/`` as a transformers ``save_pretrained``
folder, and ``internvl_original/`` when ``model.internvl_path`` is an original-layout folder).

``--state-dict`` holds the adapter's own keys, e.g. a ZeRO checkpoint consolidated to fp32
(DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``) and saved with ``torch.save``. The
``model.*`` overrides describe the architecture and where the tokenizer / original folders are.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    from omegaconf import OmegaConf

    from unimrg.models import registry
    from unimrg.models.official_io import read_state_dict
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
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
    if not hasattr(model, "export_official"):
        raise ValueError(f"model {args.model!r} has no export_official() yet")
    missing, unexpected = model.load_state_dict(read_state_dict(args.state_dict, "--state-dict"), strict=False)
    if missing or unexpected:
        raise ValueError(f"--state-dict {args.state_dict} does not match {args.model}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]} (is model.size right?)")
    paths = model.export_official(args.out)
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    return paths


if __name__ == "__main__":
    main()
