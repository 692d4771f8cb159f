"""``demo.supervised_depth``: train a deep ViT on the digits, branch, join, merge; the merged model is the s = 0 one."""
import json

import pytest

from demo import supervised_depth as sd

TINY = dict(depth=4, embed_dim=32, num_heads=2, image_size=8, patch_size=4, epochs=6, finetune_epochs=1,
            batch_size=128, lr=3e-3, finetune_lr=1e-3, warmup_iterations=4)


def test_merged_model_has_depth_over_k_and_the_s0_accuracy(tmp_path):
    out = tmp_path / "results.json"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    [result] = sd.main(argv + ["--branches", "2", "--output", str(out)])
    assert result.deep_top1 > 30  # it learned (chance: 10 %), so equal accuracies below say something
    [merged] = result.merged
    assert merged.merged_depth == 2  # 4 layers -> 2 standard blocks
    assert merged.top1 == merged.s0_top1  # the merge is exact: the deployed model is the s = 0 model
    assert merged.fusion_max_rel_err <= 1e-5
    row = sd.format_table([result]).splitlines()[-1]  # top-1 (its change from the deep model / the control)
    deltas = merged.top1 - result.deep_top1, merged.top1 - result.control_top1
    assert f"{merged.top1:.2f} ({deltas[0]:+.2f} / {deltas[1]:+.2f})" in row
    saved = json.loads(out.read_text())
    assert saved[0]["merged"][0]["top1"] == merged.top1 and saved[0]["config"]["branches"] == [2]


def test_k_that_does_not_divide_the_depth_is_refused():
    with pytest.raises(SystemExit, match="divide --depth 4"):
        sd.main(["--depth", "4", "--branches", "3"])
