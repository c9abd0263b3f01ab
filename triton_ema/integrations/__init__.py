"""Training-framework integrations, one module per framework; each alone imports its framework.

``triton_ema.integrations.lightning``, ``.transformers`` (the Trainer and
accelerate) and ``.mmengine``; importing this package imports none of them.
"""
