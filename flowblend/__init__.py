"""flowblend: compiled two-model (FlowBlending) sampling for video diffusion transformers.

The subpackages live in their own top-level folders (export/, engines/, runtime/, ...; see
pyproject's package-dir); this package holds only what all of them share.
"""
