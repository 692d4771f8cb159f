"""The main job on embedded data: DINO and CLIP pretraining, fusion, evaluation, speed, report.

    python -m demo --output-dir outputs/demo          # scikit-learn's digits, a few minutes on 2 CPU cores
    python -m demo --quick                            # the shortened run the test suite uses

An application like ``dino/`` and ``clip/`` (run from the checkout, not installed): it calls
their entry points in-process, then ``repa_ssl.eval`` and ``repa_ssl.bench``.
"""
