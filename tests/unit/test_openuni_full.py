"""Full-size OpenUni on the meta device: parameter counts per component against the published sizes.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_openuni_full.py -q -s     (-s shows the table)
"""

from __future__ import annotations

import pytest
import torch

from unimrg.models.openuni import OpenUni, OpenUniConfig
from unimrg.models.openuni.arch import PUBLISHED_MILLIONS, arch_for, vae_downsample


@pytest.fixture(scope="module")
def full() -> OpenUni:
    with torch.device("meta"):
        return OpenUni(OpenUniConfig(size="full"))


def test_counts_match_published_sizes(full):
    counts = full.component_counts()
    print("\ncomponent                 params (M)")
    for name, n in counts.items():
        print(f"  {name:<22} {n / 1e6:10.2f}")
    print("published size            ours (M)  published (M)   diff   source")
    for label, (published, parts, source) in PUBLISHED_MILLIONS.items():
        ours = sum(-counts[p[1:]] if p.startswith("-") else counts[p] for p in parts) / 1e6
        diff = ours / published - 1
        print(f"  {label:<26} {ours:9.2f} {published:12.2f} {diff:+7.2%}   {source}")
        assert abs(diff) <= 0.03, (label, ours, published)


def test_bridge_counts_follow_the_official_config(full):
    # connector: 6 pre-LN layers of width 1536 / MLP 8960 (q,k,v,out + fc1,fc2 + two LayerNorms);
    # projector Linear(1536, 2304); 256 queries of width 1536 (OpenUni openuni_l_internvl3_2b_sana_1_6b_512_hf.py).
    d, f = 1536, 8960
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    counts = full.component_counts()
    assert counts["connector"] == 6 * layer
    assert counts["projector"] == d * 2304 + 2304
    assert counts["meta_queries"] == 256 * d


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_architecture_is_consistent(size):
    arch = arch_for(size, vocab_size=300, image_token_id=260)
    text, vision = arch.internvl.text_config, arch.internvl.vision_config
    assert arch.connector.hidden_size == text.hidden_size                  # OpenUni proj_type "enc_proj"
    assert arch.sana["in_channels"] == arch.vae["latent_channels"]
    assert arch.gen_image_size // vae_downsample(arch.vae) == arch.sana["sample_size"]
    patches = (arch.vit_image_size // vision.patch_size[0]) ** 2
    assert patches * arch.internvl.downsample_ratio ** 2 == arch.image_seq_length == arch.internvl.image_seq_length
    assert not arch.internvl.tie_word_embeddings


def test_full_build_needs_no_tokenizer_until_a_loss(full):
    assert full.tokenizer is None
    with pytest.raises(ValueError, match="model.tokenizer"):
        full._tok()
