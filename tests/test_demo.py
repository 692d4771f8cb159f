"""The README's main job runs end to end (tiny model, few repeats)."""
import json

from repa_ssl import demo


def test_demo_fuses_verifies_and_times(tmp_path):
    results = demo.main(["--model", "test_repa_vit", "--baseline", "vit_tiny_patch16_224", "--batch-size", "4",
                         "--calib-batches", "2", "--repeats", "2", "--output-dir", str(tmp_path)])
    assert results["fusion"]["ok"] and results["fusion"]["max_rel_err"] <= 1e-5
    names = [r["model"] for r in results["rows"]]
    assert names == ["vanilla vit_tiny_patch16_224", "train form (eval)", "fused"]
    fused, train = results["rows"][2], results["rows"][1]
    assert fused["params_m"] < train["params_m"] and fused["gmacs"] < train["gmacs"]
    assert all(r["images_per_s"] > 0 for r in results["rows"])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| fused |" in (tmp_path / "results.md").read_text()
