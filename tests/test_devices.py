"""Device and precision choice: `auto` follows the hardware's native precision; bad names are usage errors.

Every machine here is faked (conftest's `fake_machine`), so these tests check the choice for a CPU with and without
native bf16, a CUDA GPU and Apple MPS on whatever machine runs them.
"""

import pytest
import torch
from conftest import run_cli

from sdcli import checkpoint, devices, tiling
from sdcli.checkpoint import load_model
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


MACHINES = {
    "cpu-native-bf16": ({"native_bf16": True}, CPU, torch.bfloat16),
    "cpu-emulated-bf16": ({"native_bf16": False}, CPU, torch.float32),
    "cuda": ({"cuda": True}, CUDA, torch.float16),
    "cuda-on-native-bf16-cpu": ({"cuda": True, "native_bf16": True}, CUDA, torch.float16),
    "mps": ({"mps": True}, MPS, torch.float16),
}


@pytest.mark.parametrize("machine", MACHINES)
def test_auto_device_and_dtype_on_each_kind_of_machine(fake_machine, machine):
    hardware, device, dtype = MACHINES[machine]
    fake_machine(**hardware)
    assert resolve_device("auto") == device
    assert resolve_dtype("auto", device) == dtype
    assert slow_dtype_note(dtype, device) is None  # auto never picks an emulated precision


@pytest.mark.parametrize("machine", MACHINES)
def test_cli_loads_the_model_with_each_machine_s_auto_device_and_dtype(
    fake_machine, monkeypatch, tiny_checkpoint, tmp_path, machine
):
    hardware, device, dtype = MACHINES[machine]
    fake_machine(**hardware)
    asked = []

    def load_on_cpu(path, device, dtype, offload=False, **_):
        asked.append((device, dtype))
        return load_model(path)  # the faked GPU cannot run: the image is made on the CPU in fp32

    monkeypatch.setattr(checkpoint, "load_model", load_on_cpu)
    monkeypatch.setattr(tiling, "available_memory", lambda device: None)  # a faked GPU has no memory to ask about
    result = run_cli("txt2img", "x", "-m", tiny_checkpoint, "--steps", 1, "-W", 64, "-H", 64, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert asked == [(device, dtype)]
    assert "emulated" not in result.stderr


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
def test_auto_dtype_follows_device_and_cpu_bf16(fake_machine, device, has_bf16, expected):
    fake_machine(native_bf16=has_bf16)
    assert resolve_dtype("auto", device) == expected


@pytest.mark.parametrize("name, expected", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_named_dtype_is_taken_as_given(fake_machine, name, expected):
    fake_machine(native_bf16=False)
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


def test_slow_dtype_note_only_for_emulated_cpu_precision(fake_machine):
    fake_machine(native_bf16=False)
    assert "bf16" in slow_dtype_note(torch.bfloat16, CPU)
    assert "fp16" in slow_dtype_note(torch.float16, CPU)
    assert slow_dtype_note(torch.float32, CPU) is None
    assert slow_dtype_note(torch.float16, CUDA) is None
    fake_machine(native_bf16=True)
    assert slow_dtype_note(torch.bfloat16, CPU) is None


@pytest.mark.parametrize("has_bf16", [False, True])
def test_cli_warns_once_when_the_chosen_precision_is_emulated(fake_machine, tiny_checkpoint, tmp_path, has_bf16):
    fake_machine(native_bf16=has_bf16)
    args = ["txt2img", "x", "-m", str(tiny_checkpoint), "--steps", "1", "-W", "64", "-H", "64", "--dtype", "bf16"]
    result = run_cli(*args, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "emulated" in line]
    assert warnings == (["warning: " + slow_dtype_note(torch.bfloat16, CPU)] if not has_bf16 else [])
