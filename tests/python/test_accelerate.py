"""ampkit.integrations.accelerate.AmpkitAccelerator trains on the CPU. Oracles: accelerate's own
bf16 (torch.autocast) and, for fp16 (which accelerate refuses on the CPU), the hand-written
torch.amp loop that accelerate runs on CUDA, both bitwise under the default tables; an
uninterrupted run for save_state + load_state."""
import subprocess
import sys

import pytest
import torch

import ampkit

accelerate = pytest.importorskip(
    "accelerate", reason="HF accelerate is not installed (scripts/setup.sh installs it from requirements-dev.txt)"
)
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from ampkit.integrations.accelerate import AmpkitAccelerator  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons; each test builds its own."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_import_ampkit_does_not_import_accelerate():
    code = "import ampkit, ampkit.integrations, sys; print('accelerate' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)
        self.seen = None

    def forward(self, x):
        hidden = self.fc1(x)
        act = self.act(hidden)
        if self.seen is None:
            self.seen = dict(linear=hidden.dtype, gelu=act.dtype, ampkit_region=ampkit.is_autocast_enabled("cpu"))
        return self.fc2(act)


def batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


# The first fp16 backward overflows (skips, backoffs); growth_interval 2 makes growths.
SCALER = dict(init_scale=2.0**24, backoff_factor=0.125, growth_interval=2)


def accelerate_loop(accelerator, model, opt, data, clip=1.0):
    for x, y in data:
        with accelerator.accumulate(model):
            out = model(x)
            assert out.dtype == torch.float32  # accelerate's convert_outputs_to_fp32
            loss = torch.nn.functional.mse_loss(out, y)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_trains_as_accelerate_s_own_bf16():
    ref_model, ref_opt = make()
    ref = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
    ref_model, ref_opt = ref.prepare(ref_model, ref_opt)
    accelerate_loop(ref, ref_model, ref_opt, batches())
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    model, opt = make()
    acc = AmpkitAccelerator(mixed_precision="bf16", cpu=True)
    assert acc.scaler is None and acc.autocast_dtype == torch.bfloat16
    model, opt = acc.prepare(model, opt)
    accelerate_loop(acc, model, opt, batches())
    assert model.seen == dict(linear=torch.bfloat16, gelu=torch.bfloat16, ampkit_region=True)
    assert ref_model.seen["ampkit_region"] is False
    assert_bitwise(params(model), params(ref_model))


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fp16_trains_as_the_torch_amp_loop(accumulation):
    ref_model, ref_opt = make()
    ref_scaler = torch.amp.GradScaler("cpu", **SCALER)
    for i, (x, y) in enumerate(batches()):
        with torch.autocast("cpu", dtype=torch.float16):
            out = ref_model(x)
        loss = torch.nn.functional.mse_loss(out.float(), y) / accumulation
        ref_scaler.scale(loss).backward()
        if (i + 1) % accumulation == 0:
            ref_scaler.unscale_(ref_opt)
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
            ref_scaler.step(ref_opt)
            ref_scaler.update()
            ref_opt.zero_grad()

    model, opt = make()
    acc = AmpkitAccelerator(mixed_precision="fp16", cpu=True, gradient_accumulation_steps=accumulation,
                            scaler=ampkit.GradScaler("cpu", **SCALER))
    model, opt = acc.prepare(model, opt)
    accelerate_loop(acc, model, opt, batches())
    assert model.seen == dict(linear=torch.float16, gelu=torch.float16, ampkit_region=True)
    assert acc.scaler.steps_skipped() > 0 and acc.scaler.steps_applied() > 0
    assert_bitwise(params(model), params(ref_model))
    want = ref_scaler.state_dict()
    assert {k: acc.scaler.state_dict()[k] for k in want} == want


def test_default_scaler_takes_the_grad_scaler_kwargs_handler():
    acc = AmpkitAccelerator(mixed_precision="fp16", cpu=True,
                            kwargs_handlers=[accelerate.utils.GradScalerKwargs(init_scale=1024.0, growth_interval=7)])
    assert type(acc.scaler) is ampkit.GradScaler
    state = acc.scaler.state_dict()
    assert (state["scale"], state["growth_interval"]) == (1024.0, 7)


def test_an_edited_table_decides_and_autocast_opens_an_ampkit_region():
    ampkit.set_policy("aten::gelu", "cpu", "fp32")
    model, opt = make()
    acc = AmpkitAccelerator(mixed_precision="bf16", cpu=True)
    model, opt = acc.prepare(model, opt)
    accelerate_loop(acc, model, opt, batches(1))
    assert model.seen == dict(linear=torch.bfloat16, gelu=torch.float32, ampkit_region=True)
    with acc.autocast():
        assert ampkit.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with acc.autocast(accelerate.utils.AutocastKwargs(enabled=False)):
        assert not torch.is_autocast_enabled("cpu")
    unwrapped = acc.unwrap_model(model, keep_fp32_wrapper=False)
    unwrapped.seen = None
    unwrapped(torch.randn(2, 8))
    assert unwrapped.seen["ampkit_region"] is False


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected mixed_precision to be 'fp16', 'bf16' or 'no', got 'fp8'"):
        AmpkitAccelerator(mixed_precision="fp8", cpu=True)
    with pytest.raises(ValueError, match="expected no scaler with mixed_precision='bf16'"):
        AmpkitAccelerator(mixed_precision="bf16", cpu=True, scaler=ampkit.GradScaler("cpu"))


def test_save_state_and_load_state_continue_as_an_uninterrupted_run(tmp_path):
    data = batches()
    model, opt = make()
    acc = AmpkitAccelerator(mixed_precision="fp16", cpu=True, scaler=ampkit.GradScaler("cpu", hysteresis=2, **SCALER))
    model, opt = acc.prepare(model, opt)
    accelerate_loop(acc, model, opt, data[:4])
    assert acc.scaler.steps_skipped() > 0  # the state saved is not the initial one
    acc.save_state(tmp_path / "ckpt")
    saved = acc.scaler.state_dict()
    accelerate_loop(acc, model, opt, data[4:])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    # A new process starts from other weights and a default scaler: load_state restores both.
    resumed_model, resumed_opt = make(seed=1)
    resumed = AmpkitAccelerator(mixed_precision="fp16", cpu=True)
    resumed_model, resumed_opt = resumed.prepare(resumed_model, resumed_opt)
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.scaler.state_dict() == saved
    accelerate_loop(resumed, resumed_model, resumed_opt, data[4:])
    assert_bitwise(params(resumed_model), params(model))
    assert resumed.scaler.state_dict() == acc.scaler.state_dict()


def test_the_recipe_without_the_helper_trains_as_the_helper(tmp_path):
    """docs/integrations.md's hand-written recipe on a plain Accelerator."""
    model, opt = make()
    acc = AmpkitAccelerator(mixed_precision="fp16", cpu=True, scaler=ampkit.GradScaler("cpu", **SCALER))
    model, opt = acc.prepare(model, opt)
    accelerate_loop(acc, model, opt, batches())
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    hand_model, hand_opt = make()
    plain = accelerate.Accelerator(mixed_precision="no", cpu=True)
    scaler = ampkit.GradScaler("cpu", **SCALER)
    plain.register_for_checkpointing(scaler)
    hand_model, hand_opt = plain.prepare(hand_model, hand_opt)
    for x, y in batches():
        with plain.accumulate(hand_model):
            with ampkit.autocast("cpu", dtype=torch.float16):
                out = hand_model(x)
            loss = torch.nn.functional.mse_loss(out.float(), y)
            plain.backward(scaler.scale(loss))
            if plain.sync_gradients:
                scaler.unscale_(hand_opt)
                plain.clip_grad_norm_(hand_model.parameters(), 1.0)
                scaler.step(hand_opt)
                scaler.update()
            hand_opt.zero_grad()
    assert_bitwise(params(hand_model), params(model))
    assert scaler.state_dict() == acc.scaler.state_dict()
    plain.save_state(tmp_path / "ckpt")
    restored = ampkit.GradScaler("cpu")
    loaded = torch.load(tmp_path / "ckpt" / "custom_checkpoint_0.pkl", weights_only=False)
    restored.load_state_dict(loaded)
    assert restored.state_dict() == scaler.state_dict()
