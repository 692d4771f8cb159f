"""repa_ssl.convert_sync_batchnorm: two gloo processes with half a batch each compute what one process computes
on the whole batch (float64), on every FFN path, sending no more than torch's SyncBatchNorm would."""
import collections
import copy
import functools
import logging

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import repa_ssl
from repa_ssl import ChannelIdleMlp
from repa_ssl.bench.ddp import AllReduceCounter, torch_sync_batchnorm_elements
from repa_ssl.layers import channel_idle_kernels, channel_idle_mlp
from repa_ssl.layers.channel_idle_kernels import SyncChannelIdleBatchNorm
from repa_ssl.sync_batchnorm import batchnorm_process_group
from conftest import randomize_batchnorms

C, HIDDEN = 16, 64
# path -> tokens per process, for which the cost model picks that path (asserted in the worker); "matrix" is
# the idle-matrix path through autograd (as under autocast), "lean" the same as one autograd function (float32/64)
PATHS = {"columns": 10, "matrix": 100, "lean": 100, "plain": 10}
KERNELS = {"columns": "ffn_column_blocks", "matrix": "ffn_idle_as_matrix", "lean": "lean_train_ffn"}


def _counted(kernel, calls: collections.Counter):
    @functools.wraps(kernel)
    def wrapper(*args, **kwargs):
        calls[kernel.__name__] += 1
        return kernel(*args, **kwargs)
    return wrapper


def _half_batch_worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    counter = AllReduceCounter()  # dist.all_reduce is the only collective the kernels use
    dist.all_reduce = counter
    ran = collections.Counter()
    for kernel in ("ffn_column_blocks", "ffn_idle_as_matrix"):
        setattr(channel_idle_kernels, kernel, _counted(getattr(channel_idle_kernels, kernel), ran))
    channel_idle_mlp.lean_train_ffn = _counted(channel_idle_mlp.lean_train_ffn, ran)
    lean_applies = channel_idle_mlp.lean_train_ffn_applies
    try:
        for path, tokens in PATHS.items():
            channel_idle_mlp.lean_train_ffn_applies = (lambda *args: False) if path == "matrix" else lean_applies
            torch.manual_seed(0)
            ref = randomize_batchnorms(ChannelIdleMlp(C, HIDDEN, idle_ratio=0.75, fast_paths=path != "plain"))
            ref = ref.double()
            synced = repa_ssl.convert_sync_batchnorm(copy.deepcopy(ref))
            # statistics on a group of their own, so they never queue behind DDP's gradient buckets on WORLD
            group = synced.norm2.process_group
            assert group is synced.norm1.process_group and group is not dist.group.WORLD
            assert dist.get_world_size(group) == 2 and group is batchnorm_process_group()  # made once
            if path != "plain":
                as_matrix = channel_idle_kernels.idle_matrix_is_cheaper(C, HIDDEN - ref.num_active, tokens, True)
                assert as_matrix == (path in ("matrix", "lean"))
            for _ in range(2):  # two steps: the running statistics' update from the global batch, twice
                x = (torch.randn(2 * tokens, 1, C, dtype=torch.float64) * 2 + 1).requires_grad_()
                g = torch.randn_like(x)
                expected = ref(x)
                (expected * g).sum().backward()
                half = slice(rank * tokens, (rank + 1) * tokens)
                x_half = x.detach()[half].requires_grad_()
                ran.clear()
                start = counter.elements
                out = synced(x_half)
                assert ran == ({KERNELS[path]: 1} if path in KERNELS else {}), path  # the synchronised fast path ran
                sent_forward = counter.elements - start
                (out * g[half]).sum().backward()
                sent_backward = counter.elements - start - sent_forward
                assert (out - expected[half]).abs().max() < 1e-9, path
                assert (x_half.grad - x.grad[half]).abs().max() < 1e-9, path
                assert (sent_forward, sent_backward) == torch_sync_batchnorm_elements([C, HIDDEN]), path
            for p in synced.parameters():
                dist.all_reduce(p.grad)  # what DDP does (it then divides by the world size)
            for (name, p), q in zip(ref.named_parameters(), synced.parameters()):
                assert (p.grad - q.grad).abs().max() < 1e-9, (path, name)
            for (name, b), s in zip(ref.named_buffers(), synced.buffers()):
                assert (b - s).abs().max() < 1e-9, (path, name)
            assert synced.norm2.num_batches_tracked == 2
        # Any other BatchNorm1d on CPU, (N, C) or (N, C, L) as a DINO head's: torch's SyncBatchNorm cannot run here.
        bn = randomize_batchnorms(nn.BatchNorm1d(3)).double()
        synced_bn = repa_ssl.convert_sync_batchnorm(copy.deepcopy(bn))
        for shape in ((4, 3), (4, 3, 5)):
            x = torch.randn(shape, dtype=torch.float64)
            expected = bn(x)
            assert (synced_bn(x[2 * rank:2 * rank + 2]) - expected[2 * rank:2 * rank + 2]).abs().max() < 1e-9
        assert all((a - b).abs().max() < 1e-9 for a, b in zip(bn.buffers(), synced_bn.buffers()))
    finally:
        dist.all_reduce = counter.original
        dist.destroy_process_group()


def test_two_processes_with_half_a_batch_each_equal_one_process_on_the_whole_batch(tmp_path):
    """Outputs, input gradients, summed parameter gradients and running statistics (both BatchNorms,
    both steps) on the column-block, idle-as-matrix (through autograd and as the lean function) and plain paths;
    each forward sends 2C + 1 + 2H + 1 elements and each backward 2C + 2H, exactly torch's SyncBatchNorm figures
    for these layers."""
    mp.spawn(_half_batch_worker, args=(str(tmp_path / "init"),), nprocs=2)


def test_conversion_keeps_parameters_keys_and_single_process_behaviour(caplog):
    torch.manual_seed(0)
    model = randomize_batchnorms(repa_ssl.create_model("test_repa_vit", num_classes=0))
    head = nn.Sequential(nn.Linear(model.num_features, 8), nn.BatchNorm1d(8))
    net = nn.Sequential(model, head)
    keys, weight = list(net.state_dict()), model.blocks[0].mlp.norm2.weight
    reference = copy.deepcopy(net)
    with caplog.at_level(logging.WARNING):
        synced = repa_ssl.convert_sync_batchnorm(net)
    for block in model.blocks:
        assert type(block.mlp.norm1) is SyncChannelIdleBatchNorm and type(block.mlp.norm2) is SyncChannelIdleBatchNorm
    assert synced is net and model.blocks[0].mlp.norm2.weight is weight  # in place, shared
    assert list(synced.state_dict()) == keys
    assert type(head[1]) is SyncChannelIdleBatchNorm and not caplog.text  # a BatchNorm1d syncs on CPU too
    with caplog.at_level(logging.WARNING):
        image_norm = repa_ssl.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)))
    assert type(image_norm[0]) is nn.BatchNorm2d and "each process normalises its own batch there (0)" in caplog.text
    images = torch.randn(2, 3, 64, 64)
    # Without a process group (one process) it is the plain model: the fast paths still run.
    assert channel_idle_kernels.fast_paths_apply(torch.zeros(4, model.embed_dim), model.blocks[0].mlp.norm2, 1)
    torch.testing.assert_close(synced(images), reference(images), rtol=0, atol=0)
    fused = repa_ssl.fuse_model(copy.deepcopy(model).eval())
    assert repa_ssl.verify_fusion(model.eval(), fused, images).max_rel_err < 1e-5

