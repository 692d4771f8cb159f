"""An evaluation whose results could not be saved fails at start, not after all the work."""
import pytest

from repa_ssl.eval import knn, linear, zeroshot


@pytest.mark.parametrize("main, argv", [
    (knn.main, ["test_repa_vit", "--data-path", "{data}"]),
    (linear.main, ["test_repa_vit", "--data-path", "{data}"]),
    (zeroshot.main, ["RePa-ViT-Test", "{data}"]),
])
def test_an_unwritable_output_dir_fails_at_start_naming_it(tmp_path, main, argv):
    (tmp_path / "a_file").write_text("not a folder")
    output_dir = tmp_path / "a_file" / "results"  # cannot be made, even by root
    # the data does not exist either: the output folder must be the first thing checked
    argv = [a.format(data=tmp_path / "no_data") for a in argv] + ["--output-dir", str(output_dir), "--device", "cpu"]
    with pytest.raises(OSError, match=f"--output-dir {output_dir} is not writable"):
        main(argv)
