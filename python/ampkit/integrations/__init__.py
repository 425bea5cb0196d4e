"""Integrations with the training frameworks users already run: import the one you use.

* ``ampkit.integrations.lightning``: ``AmpkitPrecision``, a PyTorch Lightning precision plugin.
* ``ampkit.integrations.accelerate``: ``AmpkitAccelerator``, an HF accelerate ``Accelerator``.

Neither is imported by ``import ampkit`` (nor by this package), so ampkit does not depend on
Lightning or accelerate; importing a module whose framework is missing raises ImportError.
"""
