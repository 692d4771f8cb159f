"""DINO self-supervised pretraining of RePa ViTs, built on ``repa_ssl``.

An application run from the source tree (``python -m dino.<module>``), not an installed package.
"""
