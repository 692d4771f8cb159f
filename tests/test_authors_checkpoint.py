"""The RePaViT authors' released (supervised, train-form) checkpoints load and give their logits."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import repa_ssl
from repa_ssl.models import checkpoint_filter_fn

# Key names and shapes of the authors' checkpoints (tests/data/README.md says where they come from).
KEYS_FILE = Path(__file__).resolve().parent / "data" / "official-repavit-state-dict-keys.json"
# Dimensions of the authors' RePaViT_Small.
SMALL = dict(embed_dim=384, depth=12, heads=6, hidden=1536, patches=196, classes=1000)


def authors_shapes(arch: str) -> dict[str, list[int]]:
    return json.loads(KEYS_FILE.read_text())[arch]


def random_authors_state_dict(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(100)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(".weight") and len(shape) == 1:  # norm gains
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.05 * torch.randn(shape, generator=g)
    return sd


def authors_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, idle_ratio: float = 0.75) -> torch.Tensor:
    """Independent functional re-statement of the authors' model (official-repavit.md), incl. their
    masked activation, to compare logits with."""
    B = x.shape[0]
    C, H, D = SMALL["embed_dim"], SMALL["heads"], SMALL["depth"]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]
    x = F.layer_norm(x, (C,), sd["norm_pre.weight"], sd["norm_pre.bias"], eps=1e-6)
    N = x.shape[1]
    act_channels = math.ceil(SMALL["hidden"] * (1 - idle_ratio))
    mask = torch.arange(SMALL["hidden"]) < act_channels
    for i in range(D):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (C,), sd[p + "attn.norm.weight"], sd[p + "attn.norm.bias"], eps=1e-5)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]) \
            .reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(o, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        def bn(t, n):
            return F.batch_norm(t, sd[p + f"mlp.{n}.running_mean"], sd[p + f"mlp.{n}.running_var"],
                                sd[p + f"mlp.{n}.weight"], sd[p + f"mlp.{n}.bias"], False, 0.0, 1e-5)
        h = F.linear(bn(x.reshape(-1, C), "norm1"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        h = torch.where(mask, F.gelu(h), h)
        x = x + F.linear(bn(h, "norm2"), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]).reshape(B, N, C)
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("arch,name", [("RePaViT_Small", "repa_vit_small_patch16_224"),
                                       ("RePaViT_Base", "repa_vit_base_patch16_224")])
def test_every_authors_key_maps_onto_our_model(arch, name):
    shapes = authors_shapes(arch)
    model = timm.create_model(name, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = checkpoint_filter_fn({k: torch.empty(s, device="meta") for k, s in shapes.items()}, model)
    assert {k: list(v.shape) for k, v in mapped.items()} == ours


def test_authors_weights_give_the_authors_logits(tmp_path):
    sd = random_authors_state_dict(authors_shapes("RePaViT_Small"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = authors_forward(sd, x)
    # As a user would load a downloaded release: timm's pretrained path with a local file,
    # in the authors' {'model': state_dict} wrapper.
    path = tmp_path / "RePaViT_Small.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = timm.create_model("repa_vit_small_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        got = model(x)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
        fused = repa_ssl.fuse_model(model)
        assert torch.allclose(fused(x), expected, rtol=1e-4, atol=1e-4)
