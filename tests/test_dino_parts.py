"""DINO building blocks: head, multi-crop wrapper, augmentation, parameter groups, clipping, freezing."""
import pytest
import torch
from PIL import Image
from torch import nn

from dino.augment import DataAugmentationDINO
from dino.backbone import build_backbone
from dino.head import DINOHead
from dino.optim import build_optimizer, cancel_gradients_last_layer, clip_gradients
from dino.wrapper import MultiCropWrapper


def test_head_normalises_and_freezes_the_prototype_norm():
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 24), (24, 24), (24, 8)]
    assert all(torch.all(m.bias == 0) for m in linears)
    # Prototypes have unit norm and the bottleneck is L2-normalised: |logit| <= 1.
    assert head(torch.randn(5, 16) * 100).abs().max() <= 1 + 1e-5
    assert DINOHead(16, 32, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


class _CountingBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x.mean(dim=(2, 3))  # (N, 3): keeps which crop each row came from


def test_wrapper_runs_backbone_once_per_resolution_crop_major():
    backbone = _CountingBackbone()
    wrapper = MultiCropWrapper(backbone, nn.Identity())
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)]
    crops += [torch.full((2, 3, 4, 4), float(i)) for i in range(2, 5)]
    out = wrapper(crops)
    assert backbone.calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # B rows of crop 0, then crop 1, ...


def test_backbone_takes_global_and_local_crop_sizes():
    wrapper = MultiCropWrapper(build_backbone("test_repa_vit"), nn.Identity())
    out = wrapper([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
    assert out.shape == (6, 64)


def test_augmentation_gives_global_then_local_crops():
    aug = DataAugmentationDINO(local_crops_number=3, global_crop_size=32, local_crop_size=16)
    crops = aug(Image.new("RGB", (50, 40), (120, 30, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert aug.global_transfo1.transforms[2].p == 1.0 and aug.global_transfo2.transforms[2].p == 0.1
    assert aug.global_transfo2.transforms[3].p == 0.2 and aug.local_transfo.transforms[2].p == 0.5


def test_param_groups_exclude_biases_and_1d_tensors_from_weight_decay():
    model = MultiCropWrapper(build_backbone("test_repa_vit"), DINOHead(64, 16, hidden_dim=8, bottleneck_dim=4))
    opt = build_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["apply_wd"] for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if not g["apply_wd"] for p in g["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.mlp.fc1.weight"} <= decayed
    assert {"backbone.blocks.0.mlp.fc1.bias", "backbone.blocks.0.mlp.norm1.weight", "backbone.norm.weight"} <= plain
    assert all(not n.endswith(".bias") for n in decayed)
    assert "head.last_layer.parametrizations.weight.original0" not in decayed | plain  # frozen gain


def test_gradients_are_clipped_per_tensor():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.full((4,), 10.0), torch.full((3,), 0.1)
    clip_gradients([a, b], 3.0)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)  # big one scaled to the limit ...
    torch.testing.assert_close(b.grad, torch.full((3,), 0.1))  # ... small one untouched (not a global norm)


def test_last_layer_gradients_are_dropped_while_frozen():
    head = DINOHead(4, 6, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    head(torch.randn(3, 4)).sum().backward()
    cancel_gradients_last_layer(epoch=0, model=head, freeze_last_layer=1)
    assert all(p.grad is None for n, p in head.named_parameters() if "last_layer" in n)
    assert all(p.grad is not None for n, p in head.named_parameters() if "last_layer" not in n)
    head(torch.randn(3, 4)).sum().backward()
    cancel_gradients_last_layer(epoch=1, model=head, freeze_last_layer=1)
    assert all(p.grad is not None for p in head.parameters())
