"""The capability probe and the dtype choice, on both sides: this machine as it is, and this machine
made to answer and fail like an AVX2-only CPU (no AVX-512, no native bf16), where oneDNN's bf16
prepacking raises and bf16 matrix products are emulated.

The AVX2 machine is reproduced, not imitated: `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's documented ISA
cap, read when torch loads) makes oneDNN refuse bf16 with the very RuntimeError users reported,
`ATEN_CPU_CAPABILITY=avx2` caps torch's own kernels and `HYBRID_ENGINE_CPU_ISA=avx2` ours. Such
children run parts of this suite and the rlhf commands; the probe is also checked against what
oneDNN actually does, on each side, so that it cannot lie about the machine it runs on."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hybrid_engine.capability import DeviceCaps, choose_dtype, device_caps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "HYBRID_ENGINE_CPU_ISA": "avx2"}
ONEDNN_BF16_ERROR = ("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                     "avx512vl and avx512dq")

# What the probe says, and what oneDNN does when asked to prepack each dtype, in this process.
PROBE = """
import json, torch
from hybrid_engine.capability import choose_dtype, device_caps
def reorder(dtype):
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(48, 40).to(dtype), 16)
        return "ok"
    except RuntimeError as e:
        return str(e)
print(json.dumps({"caps": device_caps().as_dict(), "auto": choose_dtype("auto").message,
                  "bf16": choose_dtype("bf16").message,
                  "reorder": {name: reorder(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}}))
"""


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def probe(env: dict[str, str] | None = None) -> dict:
    return json.loads(run_python(PROBE, env).splitlines()[-1])


def prepack_agrees_with_onednn(answer: dict) -> None:
    for name, outcome in answer["reorder"].items():
        assert (name in answer["caps"]["prepack_dtypes"]) == (outcome == "ok"), (name, outcome, answer["caps"])


def test_probe_agrees_with_onednn_on_this_machine():
    answer = probe()
    prepack_agrees_with_onednn(answer)
    caps = device_caps()
    assert answer["caps"] == caps.as_dict() and caps.isa == torch.backends.cpu.get_cpu_capability()
    assert caps.is_native(torch.float32) and not caps.is_native(torch.float16)
    assert "bf16" in caps.as_dict()["prepack_dtypes"] or not caps.is_native(torch.bfloat16)


def test_avx2_only_machine_is_reproduced_and_probed():
    answer = probe(AVX2_ONLY)
    assert answer["reorder"] == {"fp32": "ok", "bf16": ONEDNN_BF16_ERROR}  # the users' crash, reproduced
    prepack_agrees_with_onednn(answer)
    assert answer["caps"] == {"device": "cpu", "isa": "AVX2", "features": [], "native_dtypes": ["fp32"],
                              "prepack_dtypes": ["fp32"]}
    assert answer["auto"] == ("dtype auto -> fp32: this CPU has no native bf16 matrix products (AVX2, no AVX-512 "
                              "BF16 or AMX)")
    assert answer["bf16"].startswith("warning: dtype bf16 on this CPU (AVX2): it has no native bf16 matrix "
                                     "products, so they run emulated, about 6x slower than fp32")


AVX2 = DeviceCaps("cpu", "AVX2", (), (torch.float32,), (torch.float32,))
AVX512_NO_BF16 = DeviceCaps("cpu", "AVX512", (), (torch.float32,), (torch.float32, torch.bfloat16))
SAPPHIRE_RAPIDS = DeviceCaps("cpu", "AVX512", ("avx512_bf16", "amx_tile"), (torch.float32, torch.bfloat16),
                             (torch.float32, torch.bfloat16))
H200 = DeviceCaps("cuda:0", "sm_90", ("sm_80+",), (torch.float32, torch.float16, torch.bfloat16), ())
T4 = DeviceCaps("cuda:0", "sm_75", (), (torch.float32, torch.float16), ())


@pytest.mark.parametrize("caps, auto", [(AVX2, torch.float32), (AVX512_NO_BF16, torch.float32),
                                        (SAPPHIRE_RAPIDS, torch.bfloat16), (H200, torch.bfloat16),
                                        (T4, torch.float16)], ids=["avx2", "avx512", "amx", "h200", "t4"])
def test_auto_picks_what_the_hardware_multiplies_natively(caps, auto):
    choice = choose_dtype("auto", caps=caps)
    assert choice.dtype == auto and not choice.warning
    assert choice.message.startswith(f"dtype auto -> {choice.name}: ") and caps.isa in choice.message


def test_explicit_dtypes_are_kept_with_a_warning_where_emulated():
    assert choose_dtype("bf16", caps=SAPPHIRE_RAPIDS).message is None
    assert choose_dtype(torch.float32, caps=AVX2).message is None
    slow = choose_dtype("bf16", caps=AVX512_NO_BF16)
    assert slow.dtype == torch.bfloat16 and slow.warning
    assert "AVX512" in slow.message and "6x slower" in slow.message and "auto picks fp32" in slow.message
    assert choose_dtype("bf16", caps=T4).warning and "auto picks fp16" in choose_dtype("bf16", caps=T4).message
    with pytest.raises(ValueError, match="dtype fp16 is unusable on a CPU"):
        choose_dtype("fp16", caps=SAPPHIRE_RAPIDS)
    with pytest.raises(ValueError, match="auto, fp32, bf16 or fp16"):
        choose_dtype(torch.int8, caps=AVX2)


def test_cpu_caps_are_consistent():
    caps = device_caps("cpu")
    assert set(caps.native) <= {torch.float32, torch.bfloat16} and set(caps.prepack) <= {torch.float32, torch.bfloat16}
    assert not caps.is_native(torch.bfloat16) or caps.can_prepack(torch.bfloat16)  # native bf16 is oneDNN's
    assert str(caps).startswith(f"cpu {caps.isa}")
    with pytest.raises(ValueError, match="no capability probe for device type 'meta'"):
        device_caps("meta")


# The parts of the suite that run bf16 and fp32 inference (prepacking, the C++ kernels, the hybrid
# engine under ZeRO-3 on 2 ranks, step 3 in bf16, the README's main job at test size with its
# report, the rlhf dtype flags), on the reproduced AVX2 machine. Before the probe decided
# prepacking, the bf16 generation tests here raised ONEDNN_BF16_ERROR. (The whole suite passes there
# too; it takes as long as here.)
AVX2_SUITE = ["tests/test_families.py::test_prefill_logits_fp32_and_bf16", "tests/test_models.py",
              "tests/test_generation.py::test_prepacking_follows_the_capability_probe",
              "tests/test_generation.py::test_prepacked_weights_follow_in_place_updates",
              "tests/test_generation.py::test_bf16_greedy_follows_hf_bf16_for_a_few_tokens",
              "tests/test_engine.py::test_readme_usage_under_zero3_tp1_and_tp2",
              "tests/test_rlhf_ppo.py::test_engine_configuration_trains_and_saves[zero3-hybrid-tp2-ema]",
              "tests/test_rlhf_train.py::test_steps_1_2_through_the_launcher_on_2_ranks",
              "tests/test_rlhf_train.py::test_step3_of_the_example",
              "tests/test_rlhf_sft.py::test_help_and_defaults", "tests/test_rlhf_sft.py::test_bad_flags_are_refused",
              "tests/test_scoring.py::test_bf16_frozen_packed_weights_score_as_the_plain_model_and_are_held_once"]


def test_suite_parts_pass_on_an_avx2_only_machine():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *AVX2_SUITE],
                          env={**os.environ, **AVX2_ONLY}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_rlhf_flags_print_the_choice_once(capsys):
    """auto is resolved before any model loads; rank 0 prints the choice, other ranks stay quiet."""
    from rlhf.args import resolve_dtype
    args = type("Args", (), {"dtype": "auto"})()
    resolve_dtype(args, "cpu")
    assert args.dtype == choose_dtype("auto").name
    assert capsys.readouterr().err.strip() == choose_dtype("auto").message
    explicit = type("Args", (), {"dtype": "fp32"})()
    resolve_dtype(explicit, "cpu")
    assert explicit.dtype == "fp32" and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="^--dtype fp16 is unusable on a CPU"):
        resolve_dtype(type("Args", (), {"dtype": "fp16"})(), "cpu")


def test_explicit_bf16_warns_once_on_an_avx2_only_machine():
    code = ("from rlhf.sft import parse_args\n"
            "args = parse_args(['--model_name_or_path', 'm', '--data_path', 'd', '--output_dir', 'o', '--dtype', 'bf16'])\n"
            "print(args.dtype)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ONLY}, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "bf16"  # DeepSpeed logs to stdout before it
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: dtype bf16")]
    assert len(warnings) == 1 and "about 6x slower than fp32" in warnings[0]
