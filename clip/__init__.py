"""OpenCLIP pretraining with RePa image towers, built on ``repa_ssl`` and ``open_clip_train``.

``clip.train`` (open_clip_train with our models and fixes), ``clip.patches`` (the fixes for
open_clip_train 3.3.0, one documented function each), ``clip.export`` (fused CLIP export, verified
on real images), ``clip.bench`` (training throughput vs vanilla OpenCLIP, side by side).

An application run from the source tree (``python -m clip.<module>``), not an installed package, so
it never shadows OpenAI's ``clip`` package in a user's environment.
"""
