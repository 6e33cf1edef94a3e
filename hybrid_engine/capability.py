"""What a device does well with each float dtype, from what torch reports on the machine that runs:
which dtypes have native (fast) matrix products, and which dtypes oneDNN can prepack linear
weights in. Every dtype choice of the project is made from it, never from the machines it was
developed on.

On a CPU without native bf16 (AVX2 only, AVX-512 without AVX-512 BF16 or AMX) oneDNN's bf16
prepacking raises and bf16 matrix products are emulated: measured on a 2-vCPU AMD EPYC with AVX2,
about 4-5 GFLOP/s against about 30 for fp32. `ONEDNN_MAX_CPU_ISA=AVX2` set before torch loads
makes an AVX-512 machine answer (and fail) like such a CPU.
"""
import functools
import platform
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
EMULATED_BF16 = ("about 6x slower than fp32: bf16 matrix products ran at 4-5 GFLOP/s against about 30 for "
                 "fp32 on a 2-vCPU AVX2 AMD EPYC")


@dataclass(frozen=True)
class DeviceCaps:
    device: str                       # "cpu", "cuda:0"
    isa: str                          # CPU: torch's vector capability (AVX512, AVX2, DEFAULT...); CUDA: sm_XY
    features: tuple[str, ...]         # what makes bf16 native here (avx512_bf16, amx_tile, sm_80+)
    native: tuple[torch.dtype, ...]   # dtypes whose matrix products run on native instructions
    prepack: tuple[torch.dtype, ...]  # dtypes oneDNN can keep linear weights prepacked in (CPU only)

    def is_native(self, dtype: torch.dtype) -> bool:
        return dtype in self.native

    def can_prepack(self, dtype: torch.dtype) -> bool:
        return dtype in self.prepack

    def as_dict(self) -> dict:
        """JSON-ready: for benchmark records, so that figures of different machines are never compared blind."""
        names = lambda dtypes: [DTYPE_NAMES[d] for d in dtypes]  # noqa: E731
        return {"device": self.device, "isa": self.isa, "features": list(self.features),
                "native_dtypes": names(self.native), "prepack_dtypes": names(self.prepack)}

    def __str__(self) -> str:
        names = lambda dtypes: ", ".join(DTYPE_NAMES[d] for d in dtypes) or "none"  # noqa: E731
        features = f" ({', '.join(self.features)})" if self.features else ""
        return (f"{self.device} {self.isa}{features}: native matrix products in {names(self.native)}; "
                f"oneDNN prepacking in {names(self.prepack)}")


def device_caps(device: torch.device | str = "cpu") -> DeviceCaps:
    """The capabilities of `device` (probed once per device and process)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_caps(device.index if device.index is not None else torch.cuda.current_device())
    if device.type != "cpu":
        raise ValueError(f"no capability probe for device type {device.type!r} (cpu and cuda are supported)")
    return _cpu_caps()


@functools.cache
def _cpu_caps() -> DeviceCaps:
    onednn = torch.backends.mkldnn.is_available()
    # False where oneDNN's bf16 path would raise: no AVX-512 BW/VL/DQ and no AVX-NE-CONVERT, or oneDNN
    # capped below them by ONEDNN_MAX_CPU_ISA.
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    features = tuple(name for name in ("avx512_bf16", "amx_tile") if onednn_bf16 and _cpu_flag(name))
    # On x86 only AVX-512 BF16 and AMX multiply bf16 natively (AVX-NE-CONVERT only converts it);
    # elsewhere (aarch64) oneDNN's bf16 support is the hardware's bf16 instructions.
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    native_bf16 = onednn_bf16 and (bool(features) or not x86)
    return DeviceCaps(device="cpu", isa=torch.backends.cpu.get_cpu_capability(), features=features,
                      native=(torch.float32, *((torch.bfloat16,) if native_bf16 else ())),
                      prepack=((torch.float32,) if onednn else ()) + ((torch.bfloat16,) if onednn_bf16 else ()))


def _cpu_flag(name: str) -> bool:
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)  # private torch helpers, present since 2.3
    return bool(probe and probe())


@functools.cache
def _cuda_caps(index: int) -> DeviceCaps:
    major, minor = torch.cuda.get_device_capability(index)
    bf16 = major >= 8  # tensor-core bf16 from Ampere on; earlier GPUs emulate it
    return DeviceCaps(device=f"cuda:{index}", isa=f"sm_{major}{minor}", features=("sm_80+",) if bf16 else (),
                      native=(torch.float32, torch.float16, *((torch.bfloat16,) if bf16 else ())), prepack=())


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    message: str | None  # what to print once at start: the auto choice and why, or a warning
    warning: bool = False

    @property
    def name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def choose_dtype(requested: str | torch.dtype, device: torch.device | str = "cpu",
                 caps: DeviceCaps | None = None) -> DtypeChoice:
    """The dtype to run in for a request: "auto" (bf16 where its matrix products are native, fp32
    otherwise on a CPU, fp16 on a GPU without bf16), or a named dtype, which is kept (fp16 is refused
    on a CPU) with a warning when this device has no native matrix products for it."""
    caps = caps or device_caps(device)
    if requested == "auto":
        return _auto(caps)
    dtype = DTYPES[requested] if isinstance(requested, str) else requested
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {requested}")
    if caps.device == "cpu" and dtype == torch.float16:
        raise ValueError("dtype fp16 is unusable on a CPU (fp16 matrix products run hundreds of times slower); "
                         "use auto, bf16 or fp32")
    if caps.is_native(dtype):
        return DtypeChoice(dtype, None)
    slower = EMULATED_BF16 if _kind(caps) == "CPU" else "far slower than native dtypes"
    return DtypeChoice(dtype, f"warning: dtype {DTYPE_NAMES[dtype]} on this {_kind(caps)} ({caps.isa}): it has no "
                              f"native {DTYPE_NAMES[dtype]} matrix products, so they run emulated, {slower}; "
                              f"dtype auto picks {_auto(caps).name} here", warning=True)


def _auto(caps: DeviceCaps) -> DtypeChoice:
    if caps.is_native(torch.bfloat16):
        why = f"native bf16 matrix products ({caps.isa}, {', '.join(caps.features)})"
        return DtypeChoice(torch.bfloat16, f"dtype auto -> bf16: this {_kind(caps)} has {why}")
    if caps.is_native(torch.float16):
        return DtypeChoice(torch.float16, f"dtype auto -> fp16: this GPU ({caps.isa}) has no native bf16")
    return DtypeChoice(torch.float32, f"dtype auto -> fp32: this CPU has no native bf16 matrix products ({caps.isa}"
                                      f"{'' if caps.features else ', no AVX-512 BF16 or AMX'})")


def _kind(caps: DeviceCaps) -> str:
    return "GPU" if caps.device.startswith("cuda") else "CPU"
