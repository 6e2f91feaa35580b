"""CPU numerics pinned, so that a CPU run gives the same bytes on any x86-64 CPU with AVX2.

    cpu_numerics.pin_environment()   # stage.start and tests/conftest.py: before torch loads
    cpu_numerics.pin_torch()         # modeling.load_base on CPU: threads and attention kernel
    cpu_numerics.describe()          # meta.json "run" -> "cpu_numerics": what the run used

What changes a CPU run's floats (issue 27 item 10), measured with tests/test_train.py's short
run (tiny Llama, NF4 base, bf16 autocast, 6 optimizer steps) on an AMD EPYC with AVX-512 and
AVX512-BF16, 2 cores; another machine emulated with the libraries' own switches:
- torch's kernels (ATEN_CPU_CAPABILITY avx512 -> avx2): loss at step 6 5.439784 -> 5.439872,
  adapter bytes differ;
- oneDNN's, which run the bf16 matmuls (ONEDNN_MAX_CPU_ISA AVX2): 5.439784 -> 5.439566;
- both (a CPU without AVX-512): 5.439733; with 1 thread instead of 2, the same as with 2;
- MKL (MKL_ENABLE_INSTRUCTIONS AVX2): no change here (under bf16 autocast the training
  matmuls are oneDNN's), but an fp32 matmul (the merge runs them) gave other bytes on an Intel
  Xeon than here unless MKL_CBWR=AVX2 pinned MKL's code path, and then only at the same
  thread count (2: equal; 16 there: not);
- the thread count: 1, 2 and 4 threads gave the same losses here (tensors this small stay
  below torch's parallel grain), but a sum over 2^20 floats differs between 2 and 8 threads;
- the CPU flash-attention kernel (scaled_dot_product_attention's default on CPU): with all
  the pins above, an attention forward/backward probe still gave other bytes on an Intel Xeon
  with AMX than here; with the math kernel both machines gave the same bytes (native and
  pinned ISA alike, 2 and 16 threads; that Xeon ran torch 2.11, this one 2.13).
None of the differences is large (every loss within 1.1e-4 relative after 6 steps; the
embedded default's final train loss 3.951074 -> 3.950050 after 153 steps, eval 3.900860 ->
3.901139), but each one changes the adapter's bytes, so dvc.lock's hash held only per machine.

So a CPU run asks torch and oneDNN for their AVX2 kernels (every x86-64 CPU since Intel
Haswell, 2013, and AMD Excavator, 2015), MKL for its AVX2 branch, a fixed number of
intra-op threads (THREADS, whatever the machine has) and the math attention kernel. Inside
the emulations above (default, ISA capped, 1 or 2 threads) that gives bitwise-identical
losses and adapter bytes (tests/test_train.py runs one of them in a subprocess); the
embedded default's adapter too (153 steps, default vs AVX2 kernels + OMP_NUM_THREADS=1; its
final train loss 3.950812, within 7e-5 of the unpinned run's).

Cost, measured on the same machine (2 shared cores), the short run's 6 steps, fastest of 3:
2.6 s pinned vs 2.3 s native at 2 threads, 2.4 s vs 2.3 s at 1 thread (AVX2 kernels and math
attention: at most 13% here; the embedded default's median step 3.06 s pinned vs 2.98 s
unpinned, both 2 threads on the shared cores). On a CPU with many cores the fixed thread
count is the larger cost (not measured: this machine has 2 cores): set
MEDQLORA_CPU_THREADS=<n> (bytes then equal among runs with that n) or
MEDQLORA_CPU_NUMERICS=native (the CPU's own kernels and threads: fastest, bytes equal only
on the same machine with the same thread count). GPU runs: the environment variables govern only
the CPU-side work; threads and attention are left alone.
"""
from __future__ import annotations

import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

MODE = "MEDQLORA_CPU_NUMERICS"    # portable (default) | native
THREADS_VAR = "MEDQLORA_CPU_THREADS"
THREADS = 2                       # intra-op threads of a portable CPU run, on any machine
# Read by the libraries when they first run a kernel, so set before torch computes anything.
# An explicit value in the environment is kept (and recorded by describe()).
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's vectorised kernels: the AVX2 build, not AVX-512
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN (bf16 matmuls): no AVX-512, AVX512-BF16 or AMX
    "MKL_CBWR": "AVX2",             # MKL's conditional numerical reproducibility branch
}


def portable(environ=None) -> bool:
    """True unless MEDQLORA_CPU_NUMERICS=native."""
    environ = os.environ if environ is None else environ
    mode = environ.get(MODE, "portable").strip().lower()
    if mode not in ("portable", "native"):
        raise ValueError(f"{MODE}={environ[MODE]!r}: use portable (same bytes on any x86-64 "
                         "CPU with AVX2) or native (the CPU's own kernels and threads)")
    return mode == "portable"


def threads(environ=None) -> int:
    """The intra-op thread count of a portable CPU run: MEDQLORA_CPU_THREADS, else THREADS."""
    environ = os.environ if environ is None else environ
    value = environ.get(THREADS_VAR, str(THREADS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VAR}={value!r}: a whole number of threads, 1 or more")
    return int(value)


def has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU runs torch's AVX2 kernels (avx2 and fma flags); False when unknown,
    since asking for AVX2 kernels on a CPU without them would die on an illegal instruction."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def pin_environment(environ=None) -> tuple[str, ...]:
    """Ask torch, oneDNN and MKL for their AVX2 code paths; returns the variables set.

    Call before torch is imported (stage.start does, first thing). Nothing is set in native
    mode, on a CPU that is not x86-64 with AVX2, or for a variable the environment already
    has.
    """
    environ = os.environ if environ is None else environ
    if not portable(environ) or not has_avx2():
        return ()
    added = tuple(f"{key}={value}" for key, value in PINNED_ENV.items() if key not in environ)
    for key, value in PINNED_ENV.items():
        environ.setdefault(key, value)
    if added and "torch" in sys.modules:  # too late if it has computed anything: describe()
        log.warning("%s set after torch was imported; run.cpu_numerics in meta.json says "
                    "which kernels ran", ", ".join(added))
    return added


def pin_torch() -> None:
    """On a CPU run: THREADS intra-op threads and the math attention kernel (the CPU flash
    kernel's bytes depend on the machine; the flag is torch's one switch for both devices)."""
    if not portable():
        return
    import torch
    torch.set_num_threads(threads())
    torch.backends.cuda.enable_flash_sdp(False)


def describe() -> dict[str, object]:
    """The CPU numerics this process runs with (meta.json's run.cpu_numerics)."""
    import torch
    return {
        "mode": "portable" if portable() else "native",
        "kernels": torch.backends.cpu.get_cpu_capability(),  # AVX2 when pinned on x86-64
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
        "sdpa_kernel": "flash" if torch.backends.cuda.flash_sdp_enabled() else "math",
    }
