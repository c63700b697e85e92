"""Models: loading through TransformerBridge, what ``--model`` names, the built-in ``tiny``, kernels."""
