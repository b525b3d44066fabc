"""Mixed precision chosen by what the device can do: never slower than float32 on the machine it runs on."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spleenkit import devices
from spleenkit.devices import Precision, choose_precision, cpu_capability, describe_precision
from spleenkit.predict import inference_amp
from spleenkit.presets import get_preset
from spleenkit.training import measure_step_seconds, training_precision, validation_precision

CPU = torch.device("cpu")
QUICK = get_preset("quick")


def fake_cpu(monkeypatch: pytest.MonkeyPatch, *, label: str, onednn: bool, native: bool | None) -> None:
    """Pretend to be another CPU: what cpu_capability reports (the decision reads nothing else)."""
    report = {"label": label, "instruction_set": label, "onednn_bfloat16": onednn, "native_bfloat16": native}
    monkeypatch.setattr(devices, "cpu_capability", lambda: report)


def test_a_cpu_without_native_bfloat16_trains_in_float32_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, label="AVX2", onednn=False, native=False)
    choice = choose_precision(CPU)
    assert choice == Precision(None, choice.reason, "AVX2")
    assert "no native bfloat16" in choice.reason and "float32" in choice.reason
    assert training_precision("quick", CPU).name == "float32"
    assert validation_precision(QUICK, CPU).name == "float32"
    assert inference_amp(QUICK, CPU) is False


def test_avx512_without_bf16_instructions_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN runs bfloat16 on any AVX-512 core, emulated where the CPU lacks AVX512_BF16
    fake_cpu(monkeypatch, label="AVX512", onednn=True, native=False)
    assert choose_precision(CPU).dtype is None


def test_asking_for_bfloat16_where_it_is_slow_still_works_but_warns(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    fake_cpu(monkeypatch, label="AVX2", onednn=False, native=False)
    with caplog.at_level(logging.WARNING, logger="spleenkit.devices"):
        choice = choose_precision(CPU, requested=True)
    assert choice.dtype == torch.bfloat16 and "slower" in choice.reason
    assert "slower than float32" in caplog.text
    with caplog.at_level(logging.WARNING, logger="spleenkit.devices"):
        assert inference_amp(QUICK, CPU, amp=True) is True
    assert training_precision("quick", CPU, amp=True).name == "bfloat16"


def test_native_bfloat16_with_correct_gradients_trains_in_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, label="AVX512_BF16", onednn=True, native=True)
    monkeypatch.setattr("spleenkit.devices.cpu_bf16_training_ok", lambda patch, strides: True)
    assert training_precision("quick", CPU).dtype == torch.bfloat16
    assert "native bfloat16" in training_precision("quick", CPU).reason
    # inference stays float32 on a CPU: the bundle's exact masks
    assert choose_precision(CPU, purpose="inference").dtype is None
    assert training_precision(get_preset("quick", amp=False), CPU).dtype is None


def test_native_bfloat16_with_wrong_gradients_for_the_patch_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, label="AVX512_BF16", onednn=True, native=True)
    monkeypatch.setattr("spleenkit.devices.cpu_bf16_training_ok", lambda patch, strides: False)
    choice = training_precision(get_preset("quick", patch_size=(32, 32, 32)), CPU)
    assert choice.dtype is None and "gradients are wrong" in choice.reason
    # validation has no backward pass: the gradient check does not apply
    assert validation_precision(get_preset("quick", patch_size=(32, 32, 32)), CPU).dtype == torch.bfloat16


@pytest.mark.parametrize(("speedup", "expected"), [(0.4, None), (1.6, torch.bfloat16)])
def test_when_the_flags_cannot_be_read_a_measured_step_decides(monkeypatch: pytest.MonkeyPatch, speedup: float,
                                                               expected: torch.dtype | None) -> None:
    fake_cpu(monkeypatch, label="AVX512", onednn=True, native=None)
    monkeypatch.setattr(devices, "measured_bfloat16_speedup", lambda: speedup)
    assert choose_precision(CPU).dtype == expected


def test_cuda_is_float16_with_a_scaler_unless_turned_off() -> None:
    scaler = devices.grad_scaler(CPU, torch.float16)
    assert not scaler.is_enabled()  # a scaler only runs for float16 on CUDA
    assert not devices.grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not devices.grad_scaler(CPU, None).is_enabled()


def test_cpu_flags_are_read_for_x86_and_arm(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "avx512_bf16" in devices._cpu_flags(x86)
    assert "bf16" in devices._cpu_flags(arm)
    assert devices._cpu_flags(tmp_path / "missing") is None


def test_a_cpu_held_to_avx2_is_seen_as_such() -> None:
    """oneDNN held to AVX2 (as on a CPU that has nothing more) runs bfloat16 emulated: the kit picks float32."""
    code = ("import json; from spleenkit.devices import choose_precision, cpu_capability; c = choose_precision('cpu');"
            "print(json.dumps([cpu_capability(), c.name, c.reason]))")
    environment = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment)
    capability, name, reason = json.loads(out.stdout.strip().splitlines()[-1])
    assert capability["onednn_bfloat16"] is False and capability["label"] == "AVX2"
    assert name == "float32" and "no native bfloat16 (AVX2)" in reason


def test_the_step_skips_the_slow_variant_where_bfloat16_is_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, label="AVX2", onednn=False, native=False)
    preset = get_preset("quick", patch_size=(32, 32, 32), num_samples=2, batch_size=1)
    result = measure_step_seconds(preset, "cpu", steps=1, warmup=0)
    assert result["mixed_seconds"] is None and result["speedup"] is None
    assert result["chosen"] == "float32" and "no native bfloat16" in result["skipped"]


def test_describe_precision_names_the_capability_and_both_choices() -> None:
    report = describe_precision("cpu")
    assert report["cpu"] == cpu_capability()
    assert report["training"]["dtype"] in {"float32", "bfloat16"}
    assert report["inference"]["dtype"] == "float32"
    assert report["training"]["reason"]


def test_the_chosen_precision_is_not_slower_than_float32_on_this_machine() -> None:
    """The promise itself, measured here: the step the kit picks is at most 10 % slower than float32's
    (alternated steps, the fastest of each, on a patch whose feature maps bfloat16 handles correctly)."""
    preset = get_preset("quick", patch_size=(48, 48, 48), num_samples=1, batch_size=1)
    result = measure_step_seconds(preset, "cpu", steps=3, warmup=1)
    chosen = result["mixed_seconds"] if result["chosen"] != "float32" else result["float32_seconds"]
    assert chosen <= 1.10 * result["float32_seconds"], result
