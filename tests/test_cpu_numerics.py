"""The CPU numerics pins (medqlora/core/cpu_numerics.py): which variables are set, when, and
what is refused. No torch computation here; tests/test_train.py trains under an emulated other
machine and compares bytes."""
from __future__ import annotations

import pytest

from medqlora.core import cpu_numerics

AVX2_FLAGS = "flags\t\t: fpu sse sse2 avx fma avx2 bmi2\n"
OLD_FLAGS = "flags\t\t: fpu sse sse2 sse4_2 avx\n"   # a CPU from before Haswell: no AVX2


@pytest.fixture
def x86_with(monkeypatch, tmp_path):
    """has_avx2() reading a fake /proc/cpuinfo on an x86-64 machine."""
    real = cpu_numerics.has_avx2
    monkeypatch.setattr(cpu_numerics.platform, "machine", lambda: "x86_64")

    def use(flags: str):
        info = tmp_path / "cpuinfo"
        info.write_text("processor\t: 0\n" + flags, encoding="utf-8")
        monkeypatch.setattr(cpu_numerics, "has_avx2", lambda: real(str(info)))
    return use


def test_portable_sets_the_avx2_paths_and_keeps_explicit_values(x86_with):
    x86_with(AVX2_FLAGS)
    env = {"MKL_CBWR": "COMPATIBLE"}
    added = cpu_numerics.pin_environment(env)
    assert added == ("ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2")
    assert env == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_native_mode_and_cpus_without_avx2_set_nothing(x86_with):
    x86_with(AVX2_FLAGS)
    env = {"MEDQLORA_CPU_NUMERICS": "native"}
    assert cpu_numerics.pin_environment(env) == () and env == {"MEDQLORA_CPU_NUMERICS": "native"}
    x86_with(OLD_FLAGS)   # asking for AVX2 kernels there would die on an illegal instruction
    env = {}
    assert cpu_numerics.pin_environment(env) == () and env == {}


def test_not_x86_is_not_pinned(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX2_FLAGS, encoding="utf-8")
    monkeypatch.setattr(cpu_numerics.platform, "machine", lambda: "aarch64")
    assert cpu_numerics.has_avx2(str(info)) is False


def test_thread_count_is_fixed_unless_asked():
    assert cpu_numerics.threads({}) == cpu_numerics.THREADS == 2
    assert cpu_numerics.threads({"MEDQLORA_CPU_THREADS": "16"}) == 16
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=f"MEDQLORA_CPU_THREADS='{bad}'"):
            cpu_numerics.threads({"MEDQLORA_CPU_THREADS": bad})


def test_an_unknown_mode_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match="MEDQLORA_CPU_NUMERICS='fast': use portable .* or native"):
        cpu_numerics.portable({"MEDQLORA_CPU_NUMERICS": "fast"})
    assert cpu_numerics.portable({})
    assert cpu_numerics.portable({"MEDQLORA_CPU_NUMERICS": "Portable"})
