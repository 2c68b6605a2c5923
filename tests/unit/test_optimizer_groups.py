"""AdamW groups: Harmon keeps MAR's no-decay rule; the others decay every trainable parameter."""

from unimrg.models.harmon import Harmon, HarmonConfig
from unimrg.models.openuni import OpenUni, OpenUniConfig


def group_names(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in groups]


def test_harmon_excludes_norms_biases_and_diffusion_head_from_decay():
    m = Harmon(HarmonConfig(size="tiny", image_size=64, mar_image_size=64, buffer_size=4))
    m.apply_freezing()
    groups = m.optimizer_groups(0.02)
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    decay, no_decay = group_names(m, groups)
    assert any(n.startswith("mar.diffloss.") for n in no_decay)
    assert not any(n.startswith("mar.diffloss.") or n.endswith(".bias") for n in decay)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def test_openuni_decays_every_trainable_parameter():
    m = OpenUni(OpenUniConfig(size="tiny"))
    m.apply_freezing()
    (only,) = m.optimizer_groups(0.02)
    assert only["weight_decay"] == 0.02 and len(only["params"]) == len(list(m.trainable_parameters()))
