"""OpenCLIP pretraining with RePa image towers, built on ``repa_ssl`` and ``open_clip_train``.

An application run from the source tree (``python -m clip.<module>``), not an installed package, so
it never shadows OpenAI's ``clip`` package in a user's environment.
"""
