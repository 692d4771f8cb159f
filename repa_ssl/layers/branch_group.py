"""K consecutive pre-norm blocks as K joining branches, and their merge into one wide block.

Depth reparameterization (the second seed paper's idea, in an exact design of ours). Layer j of a group maps
``h -> h + a_j + f_j`` with ``a_j = A_j(h)`` (attention increment) and ``f_j = F_j(h + a_j)`` (FFN
increment); the group input is ``x0``. One number ``s`` (the join) runs both stages of the design:

* stage 1, ``s`` in [0.5, 1], ``λ = 2s - 1``: branch j reads ``h_j = x0 + λ Σ_{i<j} (a_i + f_i)``; at
  ``s = 1`` this is the original deep group, at ``s = 0.5`` every branch reads ``x0``;
* stage 2, ``s`` in [0, 0.5], ``μ = 1 - 2s``: every ``a_j = A_j(x0)``; FFN j reads
  ``x0 + a_j + μ Σ_{i≠j} a_i``, so at ``s = 0`` every FFN reads ``x0 + Σ a_i``.

The group outputs ``x0 + Σ_j (a_j + f_j)``. At ``s = 0`` it is exactly one standard pre-norm block with
``K·H`` heads: :meth:`BranchGroup.fuse` builds it (``timm.utils.reparameterize_model`` calls it).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from timm.layers import Attention, LayerNorm, Mlp
from timm.models.vision_transformer import Block

from .block import RepaBlock
from .channel_idle_mlp import ChannelIdleMlp, ReparamChannelIdleMlp
from .idle_ratio import num_active_channels
from .inference_kernels import is_eager, linear_then_activation

__all__ = ["BranchGroup", "MAX_FFN_HIDDEN", "MergedBlock", "MergedRepaBlock", "ResidualAttentionBranchGroup",
           "WideResidualAttentionBlock", "branch_group", "join_stages", "merged_repa_block"]

Increment = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def join_stages(s: float) -> tuple[float, float]:
    """``(λ, μ)`` of join ``s``: ``s`` in [0.5, 1] anneals λ (sequential -> parallel), [0, 0.5] raises μ."""
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"the branch join s must be in [0, 1] (1: the deep model, 0: mergeable), got {s}")
    return max(2.0 * s - 1.0, 0.0), max(1.0 - 2.0 * s, 0.0)


def _check_branchable(block: nn.Module) -> None:
    """Refuse, naming the reason, a block whose attention or norms do not merge into a standard block."""
    if isinstance(block, ResidualAttentionBlock):
        attn = block.attn
        if hasattr(block, "ln_1_kv") or not (attn._qkv_same_embed_dim and attn.bias_k is None
                                               and not attn.add_zero_attn and attn.batch_first):
            raise ValueError("only batch-first self-attention ResidualAttentionBlocks (no cross attention, "
                             "no bias_k/add_zero_attn) can be branched")
    elif isinstance(block, (Block, RepaBlock)):
        attn = block.attn
        if type(attn) is not Attention or attn.gate is not None or not all(
                isinstance(m, nn.Identity) for m in (attn.q_norm, attn.k_norm, attn.norm)):
            raise ValueError(f"{type(attn).__name__} cannot be branched: only timm's Attention without qk_norm, "
                             "scale_norm or gate merges into a wider standard attention")
        if isinstance(block, RepaBlock) and not isinstance(block.mlp, ChannelIdleMlp):
            raise ValueError("a fused RepaBlock cannot be branched: branch the train form (fusing merges too)")
        if isinstance(block, Block) and (type(block.mlp) is not Mlp or not isinstance(block.mlp.norm, nn.Identity)):
            raise ValueError("only timm's Mlp (without scale_mlp_norm) FFNs can be branched")
    else:
        raise ValueError(f"{type(block).__name__} cannot be branched: supported are RepaBlock, timm's Block and "
                         "OpenCLIP's ResidualAttentionBlock")
    pre_norms = _parts(block)[:1 if isinstance(block, RepaBlock) else 2]  # a RePa FFN normalises with BatchNorm
    if not all(isinstance(n, nn.LayerNorm) for n in pre_norms):
        raise ValueError("branched blocks need LayerNorm pre-norms (their affines fold into the merged block)")


def _parts(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(attention norm, FFN norm, FFN activation) of a branchable block."""
    if isinstance(block, ResidualAttentionBlock):
        return block.ln_1, block.ln_2, block.mlp.gelu
    return block.norm1, block.norm2 if isinstance(block, Block) else block.mlp.norm1, block.mlp.act


def _check_group(blocks: Sequence[nn.Module]) -> None:
    """The blocks of a group must be branchable, of one kind and geometry, with one activation and norm eps."""
    for block in blocks:
        _check_branchable(block)
    kinds = {(type(b), b.attn.num_heads, b.attn.head_dim) for b in blocks}
    parts = {(repr(act), attn_norm.eps, ffn_norm.eps) for attn_norm, ffn_norm, act in map(_parts, blocks)}
    if len(kinds) > 1 or len(parts) > 1:
        raise ValueError("the blocks of a branch group differ in type, heads, activation or LayerNorm eps: "
                         "they cannot merge into one block")


def _attn_increment(block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool) -> torch.Tensor:
    if isinstance(block, ResidualAttentionBlock):
        return block.ls_1(block.attention(q_x=block.ln_1(x), attn_mask=attn_mask))
    return block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))


def _ffn_increment(block: nn.Module, v: torch.Tensor) -> torch.Tensor:
    if isinstance(block, RepaBlock):
        return block.mlp(v) - v  # the channel-idle FFN owns its residual
    if isinstance(block, ResidualAttentionBlock):
        return block.ls_2(block.mlp(block.ln_2(v)))
    return block.drop_path2(block.ls2(block.mlp(block.norm2(v))))


class BranchGroup(nn.Module):
    """K consecutive timm ``Block``s or ``RepaBlock``s as K branches that join as ``join`` (s) goes 1 -> 0.

    ``join`` is a persistent buffer (a checkpoint carries it; a tensor, so ``torch.compile`` does not
    recompile as it changes); ``s`` is its value as set, ``parallel`` (s <= 0.5) picks the stage. The
    branches keep their modules and state-dict keys (``branches.{j}.<block keys>``), so a deep model's
    weights are taken over.
    """

    def __init__(self, blocks: Sequence[nn.Module], join: float = 1.0) -> None:
        super().__init__()
        _check_group(blocks)
        self.branches = nn.ModuleList(blocks)
        device = next(self.branches.parameters()).device
        self.register_buffer("join", torch.tensor(0.0, device=device))
        self.s, self.parallel = 1.0, False
        self.set_join(join)

    def set_join(self, s: float) -> None:
        """Set the join s (see :func:`join_stages`)."""
        join_stages(s)  # validates
        if not self.join.is_meta:
            self.join.fill_(s)
        self.s, self.parallel = float(s), s <= 0.5

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = f"{prefix}join"
        if key in state_dict and not self.join.is_meta:
            self.set_join(min(max(float(state_dict[key]), 0.0), 1.0))  # the stored s, as set

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        return self._run(x, lambda block, h: _attn_increment(block, h, attn_mask, is_causal))

    def _run(self, x0: torch.Tensor, attn: Increment) -> torch.Tensor:
        if not self.parallel:  # stage 1: h_j = x0 + λ Σ_{i<j} (a_i + f_i)
            lam = 2 * self.join - 1
            done: Optional[torch.Tensor] = None
            for block in self.branches:
                h = x0 if done is None else x0 + lam * done
                a = attn(block, h)
                d = a + _ffn_increment(block, h + a)
                done = d if done is None else done + d
            return x0 + done
        # stage 2: FFN j reads x0 + a_j + μ Σ_{i≠j} a_i (lerp: exactly x0 + Σ a_i at μ = 1)
        a = [attn(block, x0) for block in self.branches]
        a_sum = torch.stack(a).sum(0)
        mu = (1 - 2 * self.join).to(a_sum.dtype)
        f = [_ffn_increment(block, x0 + torch.lerp(a_j, a_sum, mu)) for block, a_j in zip(self.branches, a)]
        return x0 + a_sum + torch.stack(f).sum(0)

    @torch.no_grad()
    def fuse(self) -> nn.Module:
        """The merged block: one standard pre-norm block with K·H heads (refused unless s = 0).

        Each branch's LayerNorm affine folds into its qkv rows / FFN input rows, its layer scale into its
        output columns; the branches' attention (and LayerNorm FFN) side by side; channel-idle FFNs
        (each fused first) become one ``ReparamChannelIdleMlp``. Folded in float64.
        """
        s = self.s
        if s != 0.0:
            from ..fusion import FusionError  # fusion imports the layers

            raise FusionError(f"a depth-branch group is at join s = {s:g}; merging needs s = 0: finish the join "
                              "schedule (repa_ssl.set_branch_join(model, 0.0), then train on) before fusing.")
        ref = self.branches[0]
        norm_eps = ref.ln_1.eps if isinstance(ref, ResidualAttentionBlock) else ref.norm1.eps
        if isinstance(ref, RepaBlock):
            mlp = _merge_channel_idle(self.branches)
            merged = widen_block(copy.deepcopy(ref), len(self.branches), mlp, norm_eps)
        else:
            mlp, ffn_eps = _merge_layernorm_ffn(self.branches)
            skeleton = WideResidualAttentionBlock.like(ref) if isinstance(ref, ResidualAttentionBlock) \
                else copy.deepcopy(ref)
            merged = widen_block(skeleton, len(self.branches), mlp, norm_eps, ffn_eps)
        qkv_w, qkv_b, proj_w, proj_b = _merge_attention(self.branches)
        for linear, w, b in ((merged.attn.qkv, qkv_w, qkv_b), (merged.attn.proj, proj_w, proj_b)):
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        return merged.train(self.training)


class ResidualAttentionBranchGroup(BranchGroup):
    """:class:`BranchGroup` of OpenCLIP ``ResidualAttentionBlock``s, with their call convention."""

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("branched ResidualAttentionBlocks are self-attention only")
        return self._run(q_x, lambda block, h: _attn_increment(block, h, attn_mask, False))

    def get_weight_dtype(self) -> torch.dtype:
        return self.branches[0].get_weight_dtype()


def branch_group(blocks: Sequence[nn.Module], join: float = 1.0) -> BranchGroup:
    """The group of ``blocks`` with the call convention of their kind."""
    cls = ResidualAttentionBranchGroup if isinstance(blocks[0], ResidualAttentionBlock) else BranchGroup
    return cls(blocks, join)


MAX_FFN_HIDDEN = 3 * 2**20
"""Most hidden activations (elements; 12 MiB in float32) a merged block's FFN makes in one call (eager mode). A
merged FFN's hidden layer is K times a deep layer's; over a whole batch that is an allocation glibc hands back to
the OS after every use, so each forward page-faults it in again (vanilla ViT-Tiny 12 -> 3, batch 8: 28k faults a
forward, 0.87x the deep model's speed). Token chunks keep the allocations reused; an FFN under the budget (a RePa
FFN's few active channels, batch 1) runs whole, as chunks cost smaller GEMMs and a concatenation. See
docs/performance.md, "Depth"."""


def _ffn_parts(x: torch.Tensor, hidden: int, max_hidden: int) -> int:
    """How many token chunks the FFN runs ``x`` in: one while tracing, compiling or exporting (one graph for every
    batch size), else as many as keep each chunk's ``hidden``-wide activations within ``max_hidden`` elements."""
    if not is_eager(x):
        return 1
    tokens = x.numel() // x.shape[-1]
    return max(1, (tokens * hidden + max_hidden - 1) // max_hidden)


class _ChunkedFFN:
    """The FFN of a merged block run over token chunks whose hidden activations stay within ``max_ffn_hidden``
    elements (exact: the FFN is token-wise). ``ffn_hidden`` is the FFN's hidden width (Σ active channels for a
    fused channel-idle FFN)."""

    max_ffn_hidden = MAX_FFN_HIDDEN
    ffn_hidden = 0

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        parts = _ffn_parts(x, self.ffn_hidden, self.max_ffn_hidden)
        if parts == 1:
            return self._mlp(x)
        return torch.cat([self._mlp(chunk) for chunk in x.flatten(0, -2).tensor_split(parts)]).view_as(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``Mlp`` with its GELU in fc1's output buffer where allowed (inference_kernels); a swapped FFN or
        a fused channel-idle one is called as it is."""
        if torch.jit.is_scripting():
            return self.mlp(x)
        else:
            mlp = self.mlp
            if type(mlp) is not Mlp:
                return mlp(x)
            return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(linear_then_activation(mlp.fc1, mlp.act, x)))))


class MergedBlock(_ChunkedFFN, Block):
    """The merged form of K timm ``Block``s: a ``Block`` (K·H heads, K times the FFN width) whose FFN runs over
    token chunks."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self._ffn(self.norm2(x))))


class MergedRepaBlock(_ChunkedFFN, RepaBlock):
    """The merged form of K ``RepaBlock``s: one fused channel-idle FFN over all branches, run over token chunks."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self._ffn(x)


class WideResidualAttentionBlock(MergedBlock):
    """A merged block with OpenCLIP's ``ResidualAttentionBlock`` call convention: merged OpenCLIP branches
    (``nn.MultiheadAttention`` cannot hold K·H heads of width C/H in a width-C model)."""

    @classmethod
    def like(cls, block: ResidualAttentionBlock) -> "WideResidualAttentionBlock":
        dim, p = block.attn.embed_dim, block.mlp.c_fc.weight
        return cls(dim, block.attn.num_heads, qkv_bias=True, device=p.device, dtype=p.dtype)

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = q_x + self.drop_path1(self.ls1(self.attn(self.norm1(q_x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self._ffn(self.norm2(x))))

    def get_weight_dtype(self) -> torch.dtype:
        return self.mlp.fc1.weight.dtype


def widen_block(block: nn.Module, branches: int, mlp: nn.Module, norm_eps: float,
                ffn_norm_eps: Optional[float] = None) -> nn.Module:
    """Make ``block`` (a timm ``Block`` or ``RepaBlock`` of the branches' geometry) the merged block, in place.

    Affine-free LayerNorms, attention with ``branches`` times the heads at the same head dim (qkv and
    proj biases on), ``mlp`` as FFN; layer scales and drop paths go (folded; an inference form). The block
    becomes a :class:`MergedBlock` / :class:`MergedRepaBlock` (same state dict; the FFN over token chunks).
    """
    if not isinstance(block, _ChunkedFFN):
        block.__class__ = MergedRepaBlock if isinstance(block, RepaBlock) else MergedBlock
    block.max_ffn_hidden = MAX_FFN_HIDDEN
    block.ffn_hidden = mlp.fc1.out_features if isinstance(mlp, Mlp) else mlp.num_active
    attn, p = block.attn, block.attn.qkv.weight
    dd = {"device": p.device, "dtype": p.dtype}
    dim = attn.qkv.in_features
    block.norm1 = LayerNorm(dim, eps=norm_eps, affine=False, **dd)
    block.attn = Attention(dim, num_heads=branches * attn.num_heads, attn_head_dim=attn.head_dim,
                           qkv_bias=True, proj_bias=True, **dd)
    block.ls1 = block.drop_path1 = nn.Identity()
    block.mlp = mlp
    if ffn_norm_eps is not None:
        block.norm2 = LayerNorm(dim, eps=ffn_norm_eps, affine=False, **dd)
        block.ls2 = block.drop_path2 = nn.Identity()
    return block


def merged_repa_block(*, branches: int, idle_ratios: Sequence[float], depth: int, dim: int,
                      mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU, device=None, dtype=None,
                      **block_kwargs) -> MergedRepaBlock:
    """Merged block ``depth`` of a RePa ViT built directly (``inference_mode=True, depth_branches=K``).

    ``idle_ratios`` are the deep model's (one per original layer); the block is what
    :meth:`BranchGroup.fuse` makes of original layers ``depth * K ... depth * K + K - 1``.
    """
    dd = {"device": device, "dtype": dtype}
    block = MergedRepaBlock(dim, mlp_ratio=mlp_ratio, act_layer=act_layer, depth=depth * branches,
                      idle_ratios=idle_ratios, inference_mode=True, **block_kwargs, **dd)
    hidden = int(dim * mlp_ratio)
    num_active = sum(num_active_channels(hidden, idle_ratios[depth * branches + j]) for j in range(branches))
    mlp = ReparamChannelIdleMlp(dim, num_active, act_layer=act_layer, **dd)
    return widen_block(block, branches, mlp, block.norm1.eps)


def _f64(t: Optional[torch.Tensor], size: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, or ``fill`` of ``size`` where the module has no such parameter (no bias, no affine)."""
    if t is None:
        return torch.full((size,), fill, dtype=torch.float64, device=like.device)
    return t.double()


def _fold(norm: nn.LayerNorm, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
          b_out: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``scale * (w_out f(w_in (n γ + β) + b_in) + b_out)`` as ``w_out' f(w_in' n + b_in') + b_out'`` (float64)."""
    dim = w_in.shape[1]
    gamma, beta = _f64(norm.weight, dim, 1.0, w_in), _f64(norm.bias, dim, 0.0, w_in)
    scale = _f64(scale, w_out.shape[0], 1.0, w_out)
    w_in = w_in.double()
    return (w_in * gamma, _f64(b_in, w_in.shape[0], 0.0, w_in) + w_in @ beta,
            scale[:, None] * w_out.double(), scale * _f64(b_out, w_out.shape[0], 0.0, w_out))


def _side_by_side(folded: list[tuple[torch.Tensor, ...]], chunks: int = 1) -> tuple[torch.Tensor, ...]:
    """Input rows stacked (per q/k/v chunk), output columns side by side, output biases summed."""
    w_in = torch.cat([f[0].reshape(chunks, -1, f[0].shape[1]) for f in folded], 1).flatten(0, 1)
    b_in = torch.cat([f[1].reshape(chunks, -1) for f in folded], 1).flatten()
    return w_in, b_in, torch.cat([f[2] for f in folded], 1), torch.stack([f[3] for f in folded]).sum(0)


def _merge_attention(branches: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    folded = []
    for block in branches:
        a = block.attn
        if isinstance(block, ResidualAttentionBlock):
            folded.append(_fold(block.ln_1, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
                                getattr(block.ls_1, "gamma", None)))
        else:
            folded.append(_fold(block.norm1, a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias,
                                getattr(block.ls1, "gamma", None)))
    return _side_by_side(folded, chunks=3)


def _merge_layernorm_ffn(branches: Sequence[nn.Module]) -> tuple[Mlp, float]:
    folded = []
    for block in branches:
        if isinstance(block, ResidualAttentionBlock):
            fc1, fc2, act, norm, ls = block.mlp.c_fc, block.mlp.c_proj, block.mlp.gelu, block.ln_2, block.ls_2
        else:
            fc1, fc2, act, norm, ls = block.mlp.fc1, block.mlp.fc2, block.mlp.act, block.norm2, block.ls2
        folded.append(_fold(norm, fc1.weight, fc1.bias, fc2.weight, fc2.bias, getattr(ls, "gamma", None)))
    w1, b1, w2, b2 = _side_by_side(folded)
    ref = fc1.weight
    mlp = Mlp(w1.shape[1], w1.shape[0], device=ref.device, dtype=ref.dtype)
    mlp.act = copy.deepcopy(act)  # one activation for all branches (checked by the group)
    for linear, w, b in ((mlp.fc1, w1, b1), (mlp.fc2, w2, b2)):
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    return mlp, norm.eps


def _merge_channel_idle(branches: Sequence[RepaBlock]) -> ReparamChannelIdleMlp:
    """One fused channel-idle FFN for all branches: ``I + Σ (linear_j - I)``, active channels side by side."""
    fused = [block.mlp.fuse() for block in branches]
    ref = fused[0].linear.weight
    eye = torch.eye(ref.shape[0], dtype=torch.float64, device=ref.device)
    active = [f for f in fused if f.fc_in is not None]
    merged = ReparamChannelIdleMlp(ref.shape[0], sum(f.num_active for f in active),
                                   device=ref.device, dtype=ref.dtype)
    merged.linear.weight.copy_(eye + sum(f.linear.weight.double() - eye for f in fused))
    merged.linear.bias.copy_(torch.stack([f.linear.bias.double() for f in fused]).sum(0))
    if active:
        merged.act = copy.deepcopy(active[0].act)
        merged.fc_in.weight.copy_(torch.cat([f.fc_in.weight.double() for f in active]))
        merged.fc_in.bias.copy_(torch.cat([f.fc_in.bias.double() for f in active]))
        merged.fc_out.weight.copy_(torch.cat([f.fc_out.weight.double() for f in active], 1))
    return merged

