"""The cast-policy tables from Python: defaults equal torch's lists; edits take effect at once."""
import subprocess
import sys

import pytest
import torch

import ampkit
from ampkit import CastPolicy

DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
# Kernels of torch's own that are no cast policy, left to torch (csrc/autocast_lists.h): CUDA builds
# register aten::_cudnn_rnn, which casts the weights and re-flattens them for cuDNN.
TORCH_OWN = {"cpu": set(), "cuda": {"aten::_cudnn_rnn"}}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_tables_equal_torch_registrations(device):
    names = torch._C._dispatch_get_all_op_names()
    torch_ops = {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, DISPATCH_KEYS[device])}
    assert set(ampkit.default_policies(device)) == torch_ops - TORCH_OWN[device]
    assert ampkit.list_policies(device) == ampkit.default_policies(device)


def test_get_set_remove_reset():
    assert ampkit.get_policy("aten::mm", "cpu") == CastPolicy.lower_precision_fp
    assert ampkit.get_policy("aten::relu", "cpu") is None
    ampkit.set_policy("aten::relu", "cpu", CastPolicy.fp32)
    ampkit.set_policy("aten::gelu", "cpu", "lower_precision_fp")  # names are accepted too
    assert ampkit.list_policies("cpu")["aten::relu"] == CastPolicy.fp32
    assert ampkit.get_policy("aten::gelu", "cpu") == CastPolicy.lower_precision_fp
    assert ampkit.get_policy("aten::relu", "cuda") is None
    assert ampkit.remove_policy("aten::relu", "cpu") is True
    assert ampkit.remove_policy("aten::relu", "cpu") is False
    ampkit.reset_policies("cpu")
    assert ampkit.list_policies("cpu") == ampkit.default_policies("cpu")


def test_edits_take_effect():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    x = torch.randn(8, dtype=torch.bfloat16)
    with ampkit.autocast("cpu"):
        assert torch.relu(x).dtype == torch.bfloat16
        ampkit.set_policy("aten::relu", "cpu", "fp32")
        out = torch.relu(x)
        assert out.dtype == torch.float32
        assert torch.equal(out, torch.relu(x.float()))
        ampkit.remove_policy("aten::mm", "cpu")
        assert torch.mm(a, b).dtype == torch.float32
        ampkit.set_policy("aten::softmax.int", "cpu", "fp32_set_opt_dtype")
        assert torch.softmax(x, 0).dtype == torch.float32
        ampkit.set_policy("aten::addcmul", "cpu", "promote")
        assert torch.addcmul(x, x, torch.randn(8)).dtype == torch.float32
    with torch.autocast("cpu"):  # torch's own autocast is not affected by ampkit's table
        assert torch.mm(a, b).dtype == torch.bfloat16


def test_custom_op_gets_a_policy():
    lib = torch.library.Library("ampkit_pytest", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CompositeImplicitAutograd")
    x = torch.randn(4)
    with ampkit.autocast("cpu"):
        assert torch.ops.ampkit_pytest.twice(x).dtype == torch.float32
    ampkit.set_policy("ampkit_pytest::twice", "cpu", "lower_precision_fp")
    with ampkit.autocast("cpu"):
        out = torch.ops.ampkit_pytest.twice(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x.bfloat16() * 2)


@pytest.mark.parametrize(
    "op,policy,device,exc,message",
    [
        ("mm", "fp32", "cpu", ValueError, "expected op as 'namespace::name'"),
        ("aten::mm.", "fp32", "cpu", ValueError, "got 'aten::mm.'"),
        ("aten::no_such_op", "fp32", "cpu", ValueError, "registered with the PyTorch dispatcher, got 'aten::no_such_op'"),
        ("aten::pow", "fp32", "cpu", ValueError, "aten::pow.Tensor_Scalar"),
        ("aten::add_.Tensor", "fp32", "cpu", ValueError, "expected an out-of-place operator"),
        ("aten::mm.out", "fp32", "cpu", ValueError, "'out' is mutable"),
        ("aten::scalar_tensor", "fp32", "cpu", ValueError, "expected an operator with a Tensor"),
        ("aten::mm", "fp32_set_opt_dtype", "cpu", ValueError, "fp32_set_opt_dtype expects"),
        ("aten::mm", "fp32_append_dtype", "cpu", ValueError, "fp32_append_dtype expects"),
        ("aten::mm", "fp64", "cpu", ValueError, "expected policy to be an ampkit.CastPolicy"),
        ("aten::mm", "fp32", "meta", ValueError, "expected device_type 'cpu' or 'cuda'"),
        ("aten::mm", "fp32", "gpu0", RuntimeError, "expected device_type to be a device type string"),  # torch's type
    ],
)
def test_refused_edits_leave_tables_unchanged(op, policy, device, exc, message):
    before = {d: ampkit.list_policies(d) for d in ("cpu", "cuda")}
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(".", r"\.")):
        ampkit.set_policy(op, device, policy)
    assert {d: ampkit.list_policies(d) for d in ("cpu", "cuda")} == before


def test_policy_enum_members():
    # The C++ enum's spelling (torch's at::autocast::CastPolicy).
    assert set(CastPolicy.__members__) == {
        "lower_precision_fp", "fp32", "fp32_set_opt_dtype", "fp32_append_dtype", "promote", "banned"}


REDEFINE = r"""
import gc, warnings, torch, ampkit
x = torch.randn(4)
lib = torch.library.Library("pyredef", "DEF")
lib.define("f(Tensor a, Tensor b, Tensor[] c, ScalarType? dtype=None) -> Tensor")
lib.impl("f", lambda a, b, c, dtype=None: a + b, "CompositeExplicitAutograd")
ampkit.set_policy("pyredef::f", "cpu", "lower_precision_fp")
ampkit.set_policy("pyredef::f", "cuda", "fp32_set_opt_dtype")
with ampkit.autocast("cpu"):
    assert torch.ops.pyredef.f(x, x, [x]).dtype == torch.bfloat16
    lib._destroy(); del lib; gc.collect()
    lib = torch.library.Library("pyredef", "DEF")
    lib.define("f(Tensor a) -> Tensor")  # fewer arguments: the old entry would read below the stack
    lib.impl("f", lambda a: a * 2, "CompositeExplicitAutograd")
    assert torch.equal(torch.ops.pyredef.f(x), x * 2)  # not rebuilt yet: runs uncast
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with ampkit.autocast("cpu"):
        assert torch.equal(torch.ops.pyredef.f(x), x.bfloat16() * 2)
assert ampkit.get_policy("pyredef::f", "cpu") == ampkit.CastPolicy.lower_precision_fp
assert ampkit.get_policy("pyredef::f", "cuda") is None
assert any("dropped the fp32_set_opt_dtype policy of 'pyredef::f' on cuda" in str(w.message) for w in caught)
print("OK")
"""


def test_an_operator_defined_again_with_fewer_arguments_is_safe():
    # In a subprocess: before the fix the kernel read below the argument stack (a crash).
    out = subprocess.run([sys.executable, "-c", REDEFINE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout + out.stderr


ARMING = r"""
import torch, ampkit
def has_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastPrivateUse1")
cpu, cuda = set(ampkit.default_policies("cpu")), set(ampkit.default_policies("cuda"))
cuda_only, cpu_only = sorted(cuda - cpu), sorted(cpu - cuda)
assert cuda_only and cpu_only and "aten::softmax.int" in cuda_only
assert not any(has_kernel(op) for op in cpu | cuda), "nothing is registered before a region"
ampkit.list_policies("cpu"); ampkit.get_policy("aten::mm", "cuda")  # reading registers nothing
assert not has_kernel("aten::mm")
with ampkit.autocast("cpu", enabled=False):
    pass
assert not has_kernel("aten::mm"), "a disabled region registers nothing"
with ampkit.autocast("cpu"):
    assert torch.softmax(torch.randn(4, 4), 1).dtype == torch.float32
assert all(has_kernel(op) for op in cpu)
assert not any(has_kernel(op) for op in cuda_only), "a CPU region leaves the CUDA-only ops alone"
# An edit of the CUDA table registers the whole table (and a removed default op keeps its kernel).
ampkit.remove_policy("aten::softmax.int", "cuda")
assert all(has_kernel(op) for op in cuda)
ampkit.set_policy("aten::relu", "cuda", "fp32")
assert has_kernel("aten::relu")
with ampkit.autocast("cpu"):  # still correct after arming: CPU calls of CUDA-only ops pass
    x = torch.randn(4, 4)
    assert torch.equal(torch.softmax(x, 1), torch.softmax(x, 1))
    assert torch.relu(x).dtype == torch.float32 and torch.mm(x, x).dtype == torch.bfloat16
print("ok")
"""


def test_a_device_types_kernels_are_registered_when_its_first_region_is_entered():
    # ampkit's one dispatch key serves every device type: a registered kernel is entered by every
    # call made in any ampkit region. Registering a table's kernels only once a region of its device
    # type is entered (or the table edited) keeps a CPU region free of cost for CUDA-only ops.
    # A subprocess: registration is once per process.
    out = subprocess.run([sys.executable, "-c", ARMING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


UNARMED_TORCH_REGION = r"""
import torch, ampkit
# Only a CUDA region was entered: the CPU table's kernels are not registered. A torch CPU region
# nested in it gets torch's own kernels for the CPU-only ops, which do what the default table says.
a = torch.randn(8, 8)
with torch.autocast("cpu", dtype=torch.bfloat16):
    want = (torch.mm(a, a), torch.avg_pool3d(a.view(1, 1, 4, 4, 4), 2), torch.cat([a, a.bfloat16()]))
with ampkit.autocast("cuda"):
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("aten::avg_pool3d", "AutocastPrivateUse1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (torch.mm(a, a), torch.avg_pool3d(a.view(1, 1, 4, 4, 4), 2), torch.cat([a, a.bfloat16()]))
for w, g in zip(want, got):
    assert w.dtype == g.dtype and torch.equal(w, g), (w.dtype, g.dtype)
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_torch_region_nested_in_a_region_of_another_device_type_matches_torch():
    out = subprocess.run([sys.executable, "-c", UNARMED_TORCH_REGION], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_policy_device_types_are_the_tables():
    assert ampkit.policy_device_types() == ["cpu", "cuda"]
    for device in ampkit.policy_device_types():
        assert ampkit.list_policies(device) == ampkit.default_policies(device)
    with pytest.raises(ValueError, match="expected device_type 'cpu' or 'cuda'"):
        ampkit.list_policies("xpu")


def test_default_cpu_table_follows_the_running_torch():
    # A torch that autocasts an op the compiled list lacks (torch 2.11's CPU Dimname overloads
    # before the list had them): simulated by registering an AutocastCPU kernel for aten::relu
    # (casting to float64, to be seen) before ampkit builds its tables, in a fresh process. The
    # warning comes from C++ (stderr) or as a Python warning, depending on which call builds the
    # tables first. In an ampkit region torch's kernel still casts the op, as under torch.autocast.
    code = (
        "import warnings, torch\n"
        "calls = []\n"
        "def kernel(x):\n"
        "    calls.append(x.dtype)\n"
        "    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):\n"
        "        return torch.ops.aten.relu.default(x.double())\n"
        "lib = torch.library.Library('aten', 'IMPL')\n"
        "lib.impl('relu', kernel, 'AutocastCPU')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import ampkit\n"
        "    table = ampkit.default_policies('cpu')\n"
        "assert 'aten::relu' not in table and 'aten::mm' in table, sorted(table)\n"
        "x = torch.randn(4)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    assert torch.relu(x).dtype == torch.float64\n"
        "with ampkit.autocast('cpu', dtype=torch.bfloat16):\n"
        "    assert torch.relu(x).dtype == torch.float64\n"
        "    assert torch.mm(x[None], x[:, None]).dtype == torch.bfloat16\n"
        "assert calls == [torch.float32, torch.float32], calls\n"
        "assert torch.relu(x).dtype == torch.float32\n"
        "print(' '.join(str(x.message) for x in w))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    assert "autocasts these operators on cpu" in out and "aten::relu" in out, out
    assert "torch's own autocast kernel casts them" in out, out
