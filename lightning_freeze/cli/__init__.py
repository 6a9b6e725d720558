"""Command-line tools: ``lightning-freeze diff`` / ``merge`` (see :mod:`.checkpoint_tools`).

Kept free of heavy imports: the checkpoint tools need only PyTorch.
"""
