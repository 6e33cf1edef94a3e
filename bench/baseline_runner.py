"""One baseline engine generating in its own venv, started by bench.generation (bench/baselines.py):

    <venv>/bin/python bench/baseline_runner.py REQUEST.json RESULT.json

REQUEST: {"engine": "vllm" | "ctranslate2" | "transformers", "model_dir": a save_pretrained checkpoint
with its tokenizer, "prompts": token ids per row, "new_tokens", "dtype": "fp32" | "bf16", "threads",
"kv_cache_bytes" (vLLM's), "launched": time.time() when the parent started this process}.
RESULT: {"engine", "version", "startup_s" (launch to engine ready), "stamps" (perf_counter seconds: the
start of the timed call, then one per next-token choice of the batch), "end" (when the call returned),
"generated": the generated ids per row}.

Timed as bench.generation times ours: a warm-up call of 2 tokens first, then one call of new_tokens,
greedy, every row forced to exactly new_tokens (EOS ignored). It imports only the standard library and
the engine: it runs in the engine's venv, outside the project's.
"""
import json
import os
import sys
import time
from collections.abc import Callable

Generate = Callable[[int], tuple[list[float], list[list[int]]]]


def vllm_engine(request: dict) -> tuple[str, Generate]:
    """vLLM's LLMEngine stepped by hand: each step() that returns outputs chose one token for every
    running row (the first one after the whole prompt, since one step admits every prompt token)."""
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # threads as ours: torch's, unpinned
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, as ours
    import torch
    import vllm

    torch.set_num_threads(request["threads"])
    prompts, batch = request["prompts"], len(request["prompts"])
    tokens = sum(len(p) for p in prompts)
    llm = vllm.LLM(model=request["model_dir"], dtype={"fp32": "float32", "bf16": "bfloat16"}[request["dtype"]],
                   # its KV cache sized to the run (by default a share of the RAM, which OPT-1.3b's weights
                   # beside ours do not leave on 24 GiB); no prefix caching, or the warm-up's prompts would
                   # spare the timed call its prefill
                   kv_cache_memory_bytes=request["kv_cache_bytes"], enable_prefix_caching=False,
                   skip_tokenizer_init=True, seed=0, max_num_seqs=batch,
                   max_num_batched_tokens=max(tokens, 2048),
                   max_model_len=max(len(p) for p in prompts) + request["new_tokens"])
    engine, calls = llm.llm_engine, iter(range(1 << 30))

    def generate(n: int) -> tuple[list[float], list[list[int]]]:
        params = vllm.SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        stamps, ids = [time.perf_counter()], [f"{next(calls)}" for _ in prompts]
        for request_id, prompt in zip(ids, prompts):
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        done = {}
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if outputs:
                stamps.append(time.perf_counter())
            done.update((o.request_id, list(o.outputs[0].token_ids)) for o in outputs if o.finished)
        return stamps, [done[i] for i in ids]
    return vllm.__version__, generate


def ctranslate2_engine(request: dict) -> tuple[str, Generate]:
    """CTranslate2's Generator on the checkpoint converted in the run's dtype; its per-token callback
    stamps the first row of each step."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    compute_type = {"fp32": "float32", "bf16": "bfloat16"}[request["dtype"]]
    converted = os.path.join(request["model_dir"], "ctranslate2")
    TransformersConverter(request["model_dir"]).convert(converted, quantization=compute_type)
    generator = ctranslate2.Generator(converted, device="cpu", compute_type=compute_type,
                                      intra_threads=request["threads"], inter_threads=1)
    with open(os.path.join(converted, "vocabulary.json")) as f:
        vocabulary = json.load(f)
    prompts = [[vocabulary[i] for i in p] for p in request["prompts"]]

    def generate(n: int) -> tuple[list[float], list[list[int]]]:
        stamps = [time.perf_counter()]

        def stamp(step) -> bool:
            if step.batch_id == 0:
                stamps.append(time.perf_counter())
            return False
        results = generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1,
                                           include_prompt_in_result=False, callback=stamp)
        return stamps, [r.sequences_ids[0] for r in results]
    return ctranslate2.__version__, generate


def transformers_engine(request: dict) -> tuple[str, Generate]:
    """transformers' generate, stamped by a logits processor: the stand-in that runs in the project's own
    venv (the tests check this protocol with it; CI has no baseline venv)."""
    import torch
    import transformers

    torch.set_num_threads(request["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[request["dtype"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=dtype).eval()
    prompts = torch.tensor(request["prompts"])

    def generate(n: int) -> tuple[list[float], list[list[int]]]:
        stamps = [time.perf_counter()]

        def stamp(input_ids, scores):
            stamps.append(time.perf_counter())
            return scores
        with torch.inference_mode():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, eos_token_id=None, pad_token_id=model.config.pad_token_id,
                                 logits_processor=transformers.LogitsProcessorList([stamp]))
        return stamps, out[:, prompts.shape[1]:].tolist()
    return transformers.__version__, generate


ENGINES = {"vllm": vllm_engine, "ctranslate2": ctranslate2_engine, "transformers": transformers_engine}


def run(request: dict) -> dict:
    version, generate = ENGINES[request["engine"]](request)
    startup_s = time.time() - request["launched"]
    generate(2)  # warm-up, as ours: allocator caches, lazily built kernels, KV cache pages
    stamps, generated = generate(request["new_tokens"])
    return {"engine": request["engine"], "version": version, "startup_s": startup_s, "stamps": stamps,
            "end": time.perf_counter(), "generated": generated}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
