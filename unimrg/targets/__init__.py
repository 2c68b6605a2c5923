"""Depth and segmentation target makers and the resumable preprocessing job (paper Appendix B.2/B.3).

    python -m unimrg.targets.job --images IMAGES.jsonl --out DIR --task-id I --num-tasks N \
        --depth-model DA_V2_DIR --sam-model SAM_DIR
    python -m unimrg.targets.job finalize --out DIR

Modules: ``depth`` (Depth Anything V2 targets), ``segmentation`` (SAM automatic-mask boundaries),
``nms`` (torchvision-free box NMS), ``ingest`` (LLaVA JSON → image list + understanding shards),
``job`` (sharded, resumable job array + Energon finalize), ``shards`` (keys, image checks, atomic
tars in unimrg.data.scenes' format), ``tiny`` (random-weight test models).
"""
