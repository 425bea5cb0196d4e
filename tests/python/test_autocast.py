"""ampkit.autocast against torch.autocast, the reference, in the same process."""
import collections.abc
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing._internal import autocast_test_lists as atl

import ampkit

AMP_DTYPES = [torch.bfloat16, torch.float16]
HAS_CUDA = torch.cuda.is_available()


def _module_for(list_name):
    if list_name.startswith("nn"):
        return torch._C._nn
    if list_name.startswith("linalg"):
        return torch._C._linalg
    if list_name.startswith("methods"):
        return None
    return torch


def _cases(device, lists):
    """(list, op, module, args, kwargs) for every entry of torch's own autocast test lists."""
    out = []
    for list_name, entries in vars(lists).items():
        if not isinstance(entries, list):
            continue
        for entry in entries:
            op, rest = entry[0], list(entry[1:])
            module = _module_for(list_name)
            if rest and not isinstance(rest[-1], (tuple, dict, list)) and not isinstance(rest[-1], torch.dtype):
                module = rest.pop()  # banned entries name their module last
            if rest and isinstance(rest[-1], torch.dtype):
                rest.pop()  # builtin-promote entries end with the expected dtype
            if len(rest) == 2 and isinstance(rest[1], dict):
                arg_sets = [(rest[0], rest[1])]
            else:
                arg_sets = [(args, {}) for args in rest]
            for i, (args, kwargs) in enumerate(arg_sets):
                out.append(pytest.param(op, module, args, kwargs, id=f"{device}-{list_name}-{op}-{i}"))
    return out


def _call(op, module, args, kwargs):
    if module is not None and hasattr(module, op):
        return getattr(module, op)(*args, **kwargs)
    return getattr(args[0], op)(*args[1:], **kwargs)


def _outcome(fn):
    try:
        return "ok", fn()
    except Exception as e:  # both must raise, with the same exception type
        return "raise", type(e)


def _assert_bitwise(got, ref):
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    elif isinstance(ref, collections.abc.Iterable) and not isinstance(ref, str):
        got, ref = list(got), list(ref)
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            _assert_bitwise(g, r)
    else:
        assert got == ref


def _parity(device, op, module, args, kwargs, dtype):
    with torch.autocast(device, dtype=dtype):
        ref = _outcome(lambda: _call(op, module, args, kwargs))
    with ampkit.autocast(device, dtype=dtype):
        got = _outcome(lambda: _call(op, module, args, kwargs))
    assert got[0] == ref[0], f"torch: {ref}, ampkit: {got}"
    if ref[0] == "ok":
        _assert_bitwise(got[1], ref[1])
    else:
        assert got[1] == ref[1] or issubclass(got[1], RuntimeError) and issubclass(ref[1], RuntimeError)


torch.manual_seed(0)
CPU_CASES = _cases("cpu", atl.AutocastCPUTestLists(torch.device("cpu")))
CUDA_CASES = _cases("cuda", atl.AutocastTestLists(torch.device("cuda"))) if HAS_CUDA else []


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("op,module,args,kwargs", CPU_CASES)
def test_parity_with_torch_autocast_cpu(op, module, args, kwargs, dtype):
    _parity("cpu", op, module, args, kwargs, dtype)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
@pytest.mark.parametrize("op,module,args,kwargs", CUDA_CASES or [pytest.param(None, None, None, None, id="none")])
def test_parity_with_torch_autocast_cuda(op, module, args, kwargs, dtype):
    _parity("cuda", op, module, args, kwargs, dtype)


def test_parity_lists_are_not_empty():
    assert len(CPU_CASES) > 50


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8 * 8 * 8)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = F.relu(self.conv(x)).flatten(1)
        h = self.norm(h)
        h = torch.tanh(self.fc1(h))
        return self.fc2(h)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA"))])
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=str)
def test_model_forward_and_grads_bitwise_equal_to_torch(device, dtype):
    torch.manual_seed(1)
    ref_net = SmallNet().to(device)
    net = SmallNet().to(device)
    net.load_state_dict(ref_net.state_dict())
    x = torch.randn(4, 3, 8, 8, device=device)
    y = torch.randint(0, 10, (4,), device=device)

    with torch.autocast(device, dtype=dtype):
        ref_out = ref_net(x)
        ref_loss = F.cross_entropy(ref_out, y)
    ref_loss.backward()
    with ampkit.autocast(device, dtype=dtype):
        out = net(x)
        loss = F.cross_entropy(out, y)
    loss.backward()

    assert out.dtype == ref_out.dtype == dtype
    _assert_bitwise(out, ref_out)
    _assert_bitwise(loss, ref_loss)
    for (name, p), rp in zip(net.named_parameters(), ref_net.parameters()):
        assert p.grad.dtype == torch.float32, name
        _assert_bitwise(p.grad, rp.grad)


def test_context_manager_and_decorator():
    a, b = torch.randn(8, 8), torch.randn(8, 8)

    @ampkit.autocast("cpu", dtype=torch.float16)
    def f():
        assert ampkit.is_autocast_enabled("cpu")
        return torch.mm(a, b)

    assert f().dtype == torch.float16
    assert not ampkit.is_autocast_enabled("cpu")
    with ampkit.autocast("cpu") as ctx:
        assert isinstance(ctx, ampkit.autocast)
        assert ampkit.get_autocast_dtype("cpu") == torch.bfloat16  # torch's CPU default
        assert torch.mm(a, b).dtype == torch.bfloat16
    assert ampkit.get_autocast_dtype("cpu") is None


def test_recursive_decorated_function_and_reused_instance():
    ac = ampkit.autocast("cpu")

    @ac
    def depth(n):
        return ampkit._C.autocast_nesting_depth() if n == 0 else depth(n - 1)

    assert depth(3) == 4
    with ac:
        with ac:
            assert ampkit._C.autocast_nesting_depth() == 2
    assert ampkit._C.autocast_nesting_depth() == 0


def test_nesting_disable_and_restore():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with ampkit.autocast("cpu", dtype=torch.bfloat16):
        with ampkit.autocast("cpu", dtype=torch.float16):
            assert torch.mm(a, b).dtype == torch.float16
            with ampkit.autocast("cpu", enabled=False):
                assert torch.mm(a, b).dtype == torch.float32
            assert torch.mm(a, b).dtype == torch.float16
        assert torch.mm(a, b).dtype == torch.bfloat16
    assert torch.mm(a, b).dtype == torch.float32


def test_exception_inside_region_restores_state():
    with pytest.raises(KeyError):
        with ampkit.autocast("cpu"):
            with ampkit.autocast("cpu", dtype=torch.float16):
                raise KeyError("boom")
    assert not ampkit.is_autocast_enabled("cpu")
    assert torch.mm(torch.randn(2, 2), torch.randn(2, 2)).dtype == torch.float32


def test_torch_autocast_is_switched_off_inside_and_restored():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ampkit.autocast("cpu", dtype=torch.float16):
            assert not torch.is_autocast_enabled("cpu")
            assert torch.mm(a, b).dtype == torch.float16  # cast once, by ampkit
        assert torch.is_autocast_enabled("cpu")
        assert torch.mm(a, b).dtype == torch.bfloat16


def test_threads_have_their_own_regions():
    a, b = torch.randn(16, 16), torch.randn(16, 16)
    results = {}
    barrier = threading.Barrier(3, timeout=120)

    def worker(name, dtype):
        try:
            ctx = ampkit.autocast("cpu", dtype=dtype) if dtype else ampkit.autocast("cpu", enabled=False)
            with ctx:
                barrier.wait()
                results[name] = {torch.mm(a, b).dtype for _ in range(100)}
        except BaseException as e:  # reported below; a dead worker must not hang the others
            barrier.abort()
            results[name] = e

    threads = [threading.Thread(target=worker, args=(n, d)) for n, d in
               [("bf16", torch.bfloat16), ("fp16", torch.float16), ("off", None)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"bf16": {torch.bfloat16}, "fp16": {torch.float16}, "off": {torch.float32}}


def test_weight_cache_per_region():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with ampkit.autocast("cpu"):
        y1, y2 = x @ w, x @ w
        assert ampkit.autocast_cache_size() == 1
        assert y1.grad_fn.next_functions[1][0] is y2.grad_fn.next_functions[1][0]
    assert ampkit.autocast_cache_size() == 0
    with ampkit.autocast("cpu", cache_enabled=False):
        x @ w
        assert ampkit.autocast_cache_size() == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(device_type="cpu", dtype=torch.float32), "expected dtype torch.float16 or torch.bfloat16, got torch.float32"),
        (dict(device_type="cpu", dtype=torch.float64), "got torch.float64"),
        (dict(device_type="meta", dtype=torch.float16), "expected device_type 'cpu' or 'cuda'"),
        (dict(device_type="nonsense"), "expected device_type to be a device type string"),
        (dict(device_type=0), "expected device_type of type str, got int"),
        (dict(device_type="cpu", dtype="bf16"), "expected dtype to be a torch.dtype or None, got 'bf16'"),
        (dict(device_type="cpu", enabled=1), "expected enabled to be a bool, got 1"),
        (dict(device_type="cpu", cache_enabled="yes"), "expected cache_enabled to be a bool or None"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ampkit.autocast(**kwargs)
    assert not ampkit.is_autocast_enabled("cpu")


def test_regions_left_out_of_order_are_refused():
    outer = ampkit._C._AutocastRegion("cpu", torch.bfloat16, True, True)
    inner = ampkit._C._AutocastRegion("cpu", torch.float16, True, True)
    outer.enter()
    inner.enter()
    with pytest.raises(RuntimeError, match="expected to leave the innermost autocast region"):
        outer.exit()
    assert ampkit.get_autocast_dtype("cpu") == torch.float16
    with pytest.raises(RuntimeError, match="already entered"):
        inner.enter()
    inner.exit()
    outer.exit()
    with pytest.raises(RuntimeError, match="expected an entered region"):
        outer.exit()


def test_banned_op_on_cuda_raises():
    # The CUDA table bans binary_cross_entropy; give the CPU table the same entry to see the error here.
    ampkit.set_policy("aten::binary_cross_entropy", "banned", "cpu")
    p, t = torch.rand(4), torch.rand(4)
    with ampkit.autocast("cpu"):
        with pytest.raises(RuntimeError, match="binary_cross_entropy_with_logits"):
            F.binary_cross_entropy(p, t)
    assert ampkit.get_policy("aten::binary_cross_entropy", "cuda") == ampkit.CastPolicy.BANNED


def test_a_privateuse1_backend_owning_the_key_gets_a_clear_error():
    code = textwrap.dedent(
        """
        import torch
        lib = torch.library.Library("_", "IMPL", "AutocastPrivateUse1")
        lib.fallback(torch.library.fallthrough_kernel)
        import ampkit
        try:
            with ampkit.autocast("cpu"):
                pass
        except RuntimeError as e:
            print("ERROR:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "expected the AutocastPrivateUse1 dispatch key to be free" in out.stdout, out.stdout + out.stderr
