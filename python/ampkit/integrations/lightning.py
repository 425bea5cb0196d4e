"""PyTorch Lightning precision plugin that runs ampkit's autocast and GradScaler.

::

    import lightning.pytorch as pl
    import ampkit
    from ampkit.integrations.lightning import AmpkitPrecision

    ampkit.set_policy("aten::gelu", "cuda", "fp32")       # the table the plugin's autocast follows
    trainer = pl.Trainer(accelerator="cuda", plugins=[AmpkitPrecision("16-mixed", "cuda")])

It is Lightning's own ``MixedPrecision`` plugin (a subclass: the ``precision="16-mixed"`` /
``"bf16-mixed"`` recipe, unscaling before gradient clipping, LBFGS refusal, checkpointing of the
scaler) with torch.amp swapped for ampkit: the forward runs under ``ampkit.autocast``, so each op
follows ampkit's cast-policy table (edited or not), and fp16 losses are scaled by an
``ampkit.GradScaler`` (bounds, hysteresis, skip reporting). The scaler's state dict is saved in
Lightning checkpoints under the key ``"AmpkitPrecision"`` and restored on resume.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from .._autocast import autocast
from .._grad_scaler import GradScaler

__all__ = ["AmpkitPrecision"]


class AmpkitPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` with ampkit's autocast and GradScaler.

    Pass it in ``pl.Trainer(plugins=[AmpkitPrecision(...)])`` (and leave ``precision`` unset).

    Args:
        precision: ``"16-mixed"`` (float16, with a GradScaler) or ``"bf16-mixed"`` (bfloat16, no
            scaler), as for Lightning's plugin.
        device: the autocast device type, ``"cpu"`` or ``"cuda"`` (ampkit's tables); other device
            types get torch's own autocast lists, as under ``ampkit.autocast``.
        scaler: the GradScaler for ``"16-mixed"``; None: ``ampkit.GradScaler(device)`` with torch's
            defaults. Pass one to set ``init_scale``, ``min_scale``, ``hysteresis``... A
            ``torch.amp.GradScaler`` works too. Must be None for ``"bf16-mixed"``.
        cache_enabled: the autocast weight cache; False by default, as in Lightning's own plugin.

    Raises:
        ValueError: ``precision`` is not one of the two (Lightning's error).
        lightning.pytorch.utilities.exceptions.MisconfigurationException: a scaler with
            ``"bf16-mixed"`` (Lightning's error).
    """

    def __init__(
        self,
        precision: Literal["16-mixed", "bf16-mixed"],
        device: str,
        scaler: Optional[torch.amp.GradScaler] = None,
        cache_enabled: bool = False,
    ) -> None:
        # Lightning's constructor would make a torch.amp.GradScaler when none is given.
        if scaler is None and precision == "16-mixed":
            scaler = GradScaler(device)
        super().__init__(precision, device, scaler)
        self.cache_enabled = cache_enabled

    def autocast_context_manager(self) -> autocast:
        """The region Lightning enters around forward passes: ``ampkit.autocast``."""
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return autocast(self.device, dtype=dtype, cache_enabled=self.cache_enabled)
