"""One table of RePa model names (``repa_ssl.models.names``) answers every caller, and every name stays."""
import itertools
import json
import re
from pathlib import Path

import open_clip
import pytest
import timm

import repa_ssl
from clip.bench import _create as clip_bench_model
from clip.train import is_repa_model
from dino.backbone import is_repa_arch
from repa_ssl.bench.suite import SPECS
from repa_ssl.eval import load_tower
from repa_ssl.models import REPA_NAMES, TEST_VIT_ARGS, find_repa_name, is_repa_name, repa_model_names, repa_variant_name
from repa_ssl.open_clip_models import CONFIG_DIR

README = Path(__file__).parents[1] / "README.md"

# The timm names registered before the table generated the θ / fused ones (checkpoints and configs name them).
TIMM_NAMES = """
demo_repa_vit demo_repa_vit_clip demo_repa_vit_clip_fused repa_vit_base_patch16_224 repa_vit_base_patch16_clip_224
repa_vit_base_patch16_clip_224_fused repa_vit_base_patch16_clip_224_idle50 repa_vit_base_patch16_clip_224_idle50_fused
repa_vit_base_patch32_clip_224 repa_vit_base_patch32_clip_224_fused repa_vit_base_patch32_clip_224_idle50
repa_vit_base_patch32_clip_224_idle50_fused repa_vit_huge_patch14_224 repa_vit_huge_patch16_224
repa_vit_large_patch14_clip_224 repa_vit_large_patch14_clip_224_fused repa_vit_large_patch14_clip_224_idle50
repa_vit_large_patch14_clip_224_idle50_fused repa_vit_large_patch16_224 repa_vit_small_patch16_224
repa_vit_tiny_patch16_224 test_repa_vit test_repa_vit_clip test_repa_vit_clip_fused
""".split()
# The merged deploy forms of the CLIP towers (depth reparameterization, K = 2: depth / 2 layers, fused).
MERGED_TIMM_NAMES = """
demo_repa_vit_clip_merged2 repa_vit_base_patch16_clip_224_merged2 repa_vit_base_patch16_clip_224_idle50_merged2
repa_vit_base_patch32_clip_224_merged2 repa_vit_base_patch32_clip_224_idle50_merged2
repa_vit_large_patch14_clip_224_merged2 repa_vit_large_patch14_clip_224_idle50_merged2 test_repa_vit_clip_merged2
""".split()


def _expand(pattern: str) -> list[str]:
    """``a_{x,y}[_z]`` -> a_x, a_x_z, a_y, a_y_z (the README's shorthand)."""
    parts = re.split(r"(\{[^}]*\}|\[[^\]]*\])", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p[1:-1], ""] if p.startswith("[") else [p]
               for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def _readme_model_names() -> list[str]:
    section = README.read_text().split("### Model names", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return [name for cells in rows for token in re.findall(r"`([^`]+)`", "".join(cells)) if "…" not in token
            for name in _expand(token)]


def test_every_name_in_the_readme_model_table_exists():
    names = _readme_model_names()
    assert len(names) >= 20
    for name in names:
        assert timm.is_model(name) or name in open_clip.list_models(), name
        assert is_repa_name(name), name


def test_timm_registers_exactly_the_tables_names_and_keeps_every_old_one():
    assert timm.list_models("*repa_vit*") == repa_model_names() == sorted(TIMM_NAMES + MERGED_TIMM_NAMES)
    assert timm.list_models(module="repa_vit") == repa_model_names()


def test_generated_names_build_their_family_at_the_named_theta_and_form():
    for name in ("repa_vit_base_patch32_clip_224_idle50_fused", "test_repa_vit_clip_fused", "demo_repa_vit_clip_fused"):
        model = timm.create_model(name, device="meta")
        family = timm.create_model(find_repa_name(name).family, device="meta")
        assert model.idle_ratios == [find_repa_name(name).idle_ratio] * len(model.blocks)
        assert model.inference_mode and not family.inference_mode
        assert model.pretrained_cfg["architecture"] == name  # its own config, not its family's
        assert (model.global_pool, model.patch_embed.img_size) == (family.global_pool, family.patch_embed.img_size)
    assert timm.create_model("test_repa_vit_clip_fused.untrained", idle_ratio=0.5).idle_ratios == [0.5, 0.5]


def test_openclip_json_configs_agree_with_the_table():
    configs = {p.stem: json.loads(p.read_text()) for p in CONFIG_DIR.glob("*.json")}
    assert sorted(configs) == repa_model_names("open_clip") == repa_ssl.repa_clip_model_names()
    for clip_name, cfg in configs.items():
        entry = find_repa_name(clip_name)
        assert cfg["vision_cfg"]["timm_model_name"] == entry.timm_name, clip_name
        family = configs[find_repa_name(entry.family).clip_name]
        same_but_tower = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "timm_model_name": entry.family}}
        assert same_but_tower == family, f"{clip_name} differs from its family's config beyond the tower name"
    for entry in REPA_NAMES:
        if entry.clip_name and not entry.model_args:  # each family: the JSON tower is the entrypoint as it is
            tower = timm.create_model(entry.timm_name, device="meta")
            vision_cfg = configs[entry.clip_name]["vision_cfg"]
            assert vision_cfg["timm_pool"] == tower.global_pool, entry.clip_name
            assert vision_cfg["image_size"] == tower.patch_embed.img_size[0], entry.clip_name


def test_variant_names_answer_theta_and_fused_form_in_either_library():
    assert repa_variant_name("RePa-ViT-B-16", idle_ratio=0.5) == "RePa-ViT-B-16-idle50"
    assert repa_variant_name("RePa-ViT-B-16-idle50", fused=True) == "RePa-ViT-B-16-idle50-fused"
    assert repa_variant_name("RePa-ViT-L-14-idle50-fused", idle_ratio=0.75, fused=False) == "RePa-ViT-L-14"
    assert repa_variant_name("repa_vit_base_patch32_clip_224", idle_ratio=0.5, fused=True) == \
        "repa_vit_base_patch32_clip_224_idle50_fused"
    assert repa_ssl.fused_model_name("RePa-ViT-Demo") == "RePa-ViT-Demo-fused"
    with pytest.raises(ValueError, match="'RePa-ViT-Test' has no variant at θ = 0.5.*RePa-ViT-Test-fused"):
        repa_variant_name("RePa-ViT-Test", idle_ratio=0.5)
    with pytest.raises(ValueError, match="timm entrypoints take idle_ratio= and inference_mode="):
        repa_variant_name("repa_vit_small_patch16_224", fused=True)
    with pytest.raises(ValueError, match="'ViT-B-16' is not a RePa model"):
        repa_variant_name("ViT-B-16", fused=True)


def test_every_caller_asks_the_table_whether_a_name_is_repa():
    assert is_repa_arch("repa_vit_small_patch16_224.in1k") and not is_repa_arch("vit_small_patch16_224")
    with pytest.raises(ValueError, match="not a timm model. RePa models: demo_repa_vit, "):
        is_repa_arch("RePa-ViT-B-16")
    assert is_repa_model("RePa-ViT-Demo") and not is_repa_model("RePa-ViT-Demo-fused") and not is_repa_model("ViT-B-32")
    with pytest.raises(repa_ssl.UnknownModelError, match="Did you mean: RePa-ViT-B-16-idle50"):
        repa_ssl.create_model("RePa-ViT-B-16-idle5O")
    assert is_repa_name("RePa-ViT-B-32-fused") and not is_repa_name("vit_base_patch16_clip_224.openai")


def test_benchmark_vanilla_twins_have_the_test_models_geometry():
    repa = timm.create_model("test_repa_vit", device="meta")
    vanilla = SPECS["tiny"].vanilla()
    assert vanilla.patch_embed.img_size == repa.patch_embed.img_size == (SPECS["tiny"].image_size,) * 2
    assert (vanilla.embed_dim, len(vanilla.blocks)) == (repa.embed_dim, len(repa.blocks)) == (
        TEST_VIT_ARGS["embed_dim"], TEST_VIT_ARGS["depth"])
    repa_clip = open_clip.create_model("RePa-ViT-Test", device="meta")
    vanilla_clip = clip_bench_model("ViT-Test (vanilla)")
    assert vanilla_clip.visual.image_size == repa_clip.visual.image_size
    assert vanilla_clip.visual.transformer.width == repa_clip.visual.trunk.embed_dim
    assert len(vanilla_clip.visual.transformer.resblocks) == len(repa_clip.visual.trunk.blocks)
    text = lambda m: {k: v.shape for k, v in m.state_dict().items() if not k.startswith("visual.")}  # noqa: E731
    assert text(vanilla_clip) == text(repa_clip)


def test_the_evaluations_take_a_tagged_timm_name_as_the_repa_model_it_is(tmp_path):
    """A fused state dict named ``test_repa_vit.untrained`` loads in fused form, as without the tag."""
    fused = repa_ssl.fuse_model(timm.create_model("test_repa_vit").eval())
    repa_ssl.save_checkpoint(fused.state_dict(), tmp_path / "fused.pth")
    tower = load_tower(tmp_path / "fused.pth", "test_repa_vit.untrained")
    assert tower.model.inference_mode and repa_ssl.is_fused(tower.model)
