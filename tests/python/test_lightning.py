"""ampkit.integrations.lightning.AmpkitPrecision trains a LightningModule on the CPU. Oracle:
Lightning's own MixedPrecision plugin (torch.autocast + torch.amp.GradScaler) with the same
options, bitwise, under the default tables; an uninterrupted run for checkpoint and resume."""
import subprocess
import sys

import pytest
import torch

import ampkit

pl = pytest.importorskip(
    "lightning.pytorch", reason="PyTorch Lightning is not installed (scripts/setup.sh installs it from requirements-dev.txt)"
)
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from ampkit.integrations.lightning import AmpkitPrecision  # noqa: E402


def test_import_ampkit_does_not_import_lightning():
    code = "import ampkit, ampkit.integrations, sys; print('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


class Net(pl.LightningModule):
    """A small MLP that records, on its first training step, which dtype its layers ran in."""

    def __init__(self, make_optimizer=None):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
        self.make_optimizer = make_optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
        self.seen = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        hidden = self.body[0](x)
        out = self.body[2](self.body[1](hidden))
        if self.seen is None:
            self.seen = dict(linear=hidden.dtype, gelu=self.body[1](hidden).dtype,
                             ampkit_region=ampkit.is_autocast_enabled("cpu"),
                             torch_region=torch.is_autocast_enabled("cpu"))
        return torch.nn.functional.mse_loss(out.float(), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 8, generator=g)
    y = torch.randn(32, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 4 steps an epoch


def make_trainer(plugin, tmp_path, max_epochs, **kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=1, plugins=[plugin], max_epochs=max_epochs, default_root_dir=tmp_path,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **kwargs,
    )


def fit(plugin, tmp_path, max_epochs=2, seed=0, ckpt_path=None, **kwargs):
    torch.manual_seed(seed)
    model = Net(kwargs.pop("make_optimizer", None))
    trainer = make_trainer(plugin, tmp_path, max_epochs, **kwargs)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, trainer


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# A scale that makes the first fp16 backward overflow (skipped steps, backoffs) and a short
# growth interval (growths): the run exercises every branch of the scaler.
SCALER = dict(init_scale=2.0**24, backoff_factor=0.125, growth_interval=2)


def test_the_plugin_runs_ampkit_regions_and_scaler():
    plugin = AmpkitPrecision("16-mixed", "cpu")
    assert isinstance(plugin, MixedPrecision) and type(plugin.scaler) is ampkit.GradScaler
    assert plugin.scaler.state_dict()["scale"] == 2.0**16  # torch's defaults
    assert AmpkitPrecision("bf16-mixed", "cpu").scaler is None
    with pytest.raises(ValueError, match="Precision must be '16-mixed' or 'bf16-mixed'"):
        AmpkitPrecision("16-true", "cpu")


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["torch SGD", "ampkit AdamW"])
def test_default_tables_train_as_lightning_mixed_precision(precision, optimizer, tmp_path):
    make_opt = ((lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if optimizer == "torch SGD"
                else (lambda p: ampkit.optim.AdamW(p, lr=1e-2)))
    fp16 = precision == "16-mixed"
    ours = AmpkitPrecision(precision, "cpu", ampkit.GradScaler("cpu", **SCALER) if fp16 else None)
    ref = MixedPrecision(precision, "cpu", torch.amp.GradScaler("cpu", **SCALER) if fp16 else None)
    got_model, _ = fit(ours, tmp_path, make_optimizer=make_opt)
    ref_model, _ = fit(ref, tmp_path, make_optimizer=make_opt)
    lowp = precision_dtype(precision)  # gelu has no entry: it runs in its input's dtype
    assert got_model.seen == dict(linear=lowp, gelu=lowp, ampkit_region=True, torch_region=True)
    assert ref_model.seen["ampkit_region"] is False
    for got, want in zip(params(got_model), params(ref_model)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if fp16:
        assert ours.scaler.steps_skipped() > 0 and ours.scaler.steps_applied() > 0
        want = ref.scaler.state_dict()
        assert {k: ours.scaler.state_dict()[k] for k in want} == want


def precision_dtype(precision):
    return torch.float16 if precision == "16-mixed" else torch.bfloat16


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_an_edited_table_decides_inside_the_plugin_s_forward(precision, tmp_path):
    ampkit.set_policy("aten::gelu", "cpu", "fp32")
    model, _ = fit(AmpkitPrecision(precision, "cpu"), tmp_path, max_epochs=1)
    assert (model.seen["linear"], model.seen["gelu"]) == (precision_dtype(precision), torch.float32)
    ampkit.set_policy("aten::linear", "cpu", "fp32")
    model, _ = fit(AmpkitPrecision(precision, "cpu"), tmp_path, max_epochs=1)
    assert model.seen["linear"] == torch.float32


@pytest.mark.parametrize("optimizer", ["torch SGD", "ampkit AdamW"])
def test_checkpoint_and_resume_continue_as_an_uninterrupted_run(optimizer, tmp_path):
    make_opt = ((lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if optimizer == "torch SGD"
                else (lambda p: ampkit.optim.AdamW(p, lr=1e-2)))
    whole = AmpkitPrecision("16-mixed", "cpu", ampkit.GradScaler("cpu", hysteresis=2, **SCALER))
    whole_model, _ = fit(whole, tmp_path / "whole", max_epochs=3, make_optimizer=make_opt)

    first = AmpkitPrecision("16-mixed", "cpu", ampkit.GradScaler("cpu", hysteresis=2, **SCALER))
    _, trainer = fit(first, tmp_path / "first", max_epochs=1, make_optimizer=make_opt)
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["AmpkitPrecision"]
    assert saved == first.scaler.state_dict() and saved["hysteresis"] == 2
    assert first.scaler.steps_skipped() > 0  # the state saved is not the initial one

    # A new process would start from other weights and a default scaler: the checkpoint restores both.
    resumed = AmpkitPrecision("16-mixed", "cpu")
    at_start = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, module):
            at_start.update(trainer.precision_plugin.scaler.state_dict())

    resumed_model, _ = fit(resumed, tmp_path / "resumed", max_epochs=3, seed=1, ckpt_path=ckpt,
                           make_optimizer=make_opt, callbacks=[Probe()])
    assert at_start == saved
    for got, want in zip(params(resumed_model), params(whole_model)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert resumed.scaler.state_dict() == whole.scaler.state_dict()
