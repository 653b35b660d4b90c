"""Device and precision choice: `auto` follows the hardware's native precision; bad names are usage errors."""

import pytest
import torch
from conftest import run_cli

from sdcli import devices
from sdcli.devices import cpu_has_native_bf16, cpuinfo_flags, resolve_device, resolve_dtype, slow_dtype_note
from sdcli.errors import UsageError

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")

# Abridged /proc/cpuinfo of a two-processor Sapphire Rapids VM and of an AVX2-only EPYC.
SAPPHIRE_RAPIDS = """\
processor\t: 0
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
EPYC_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the CPU probe answers."""

    def set_answer(value: bool) -> None:
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: value)

    return set_answer


@pytest.mark.parametrize(
    "device, has_bf16, expected",
    [
        (CUDA, False, torch.float16),
        (CUDA, True, torch.float16),
        (MPS, False, torch.float16),
        (CPU, True, torch.bfloat16),
        (CPU, False, torch.float32),
    ],
)
def test_auto_dtype_follows_device_and_cpu_bf16(native_bf16, device, has_bf16, expected):
    native_bf16(has_bf16)
    assert resolve_dtype("auto", device) == expected


@pytest.mark.parametrize("name, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_named_dtype_is_taken_as_given(native_bf16, name, expected):
    native_bf16(False)
    assert resolve_dtype(name, CPU) == expected
    assert resolve_dtype(name, CUDA) == expected


@pytest.mark.parametrize("name", ["float16", "half", "FP32", "", "int8"])
def test_unknown_dtype_is_a_usage_error(name):
    with pytest.raises(UsageError, match="unknown dtype"):
        resolve_dtype(name, CPU)


@pytest.mark.parametrize("name", ["gpu", "cuda:0x", "tpu", "CPU", ""])
def test_unknown_device_is_a_usage_error(name):
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device(name)


def test_unavailable_cuda_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_auto_device_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == CPU


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_bf16": False}, True),
        ({"avx2": True, "amx_bf16": True}, True),
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"architecture": "arm64", "neon": True, "bf16": True}, False),  # ARM bf16: not a fast path in torch yet
    ],
)
def test_bf16_probe_reads_torch_capabilities(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("text, expected", [(SAPPHIRE_RAPIDS, True), (EPYC_AVX2, False)])
def test_bf16_probe_falls_back_to_proc_cpuinfo_on_linux(monkeypatch, tmp_path, text, expected):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(devices.sys, "platform", "linux")
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_has_native_bf16() is expected


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_bf16_probe_says_no_without_a_reliable_check(monkeypatch, tmp_path, platform):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(devices.sys, "platform", platform)
    (tmp_path / "cpuinfo").write_text(SAPPHIRE_RAPIDS)  # must not be read off Linux
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "cpuinfo")
    assert cpu_has_native_bf16() is False


def test_bf16_probe_survives_a_missing_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices, "CPUINFO", tmp_path / "absent")
    assert cpu_has_native_bf16() is False


def test_cpuinfo_flags_collects_every_processor_and_arm_features():
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= cpuinfo_flags(SAPPHIRE_RAPIDS)
    assert "avx512_bf16" not in cpuinfo_flags(EPYC_AVX2)
    assert {"asimd", "bf16"} <= cpuinfo_flags("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")


def test_slow_dtype_note_only_for_emulated_cpu_precision(native_bf16):
    native_bf16(False)
    assert "bf16" in slow_dtype_note(torch.bfloat16, CPU)
    assert "fp16" in slow_dtype_note(torch.float16, CPU)
    assert slow_dtype_note(torch.float32, CPU) is None
    assert slow_dtype_note(torch.float16, CUDA) is None
    native_bf16(True)
    assert slow_dtype_note(torch.bfloat16, CPU) is None


@pytest.mark.parametrize("has_bf16", [False, True])
def test_cli_warns_once_when_the_chosen_precision_is_emulated(native_bf16, tiny_checkpoint, tmp_path, has_bf16):
    native_bf16(has_bf16)
    args = ["txt2img", "x", "-m", str(tiny_checkpoint), "--steps", "1", "-W", "64", "-H", "64", "--dtype", "bf16"]
    result = run_cli(*args, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "emulated" in line]
    assert warnings == (["warning: " + slow_dtype_note(torch.bfloat16, CPU)] if not has_bf16 else [])
