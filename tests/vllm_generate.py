"""Greedy generation with ``vllm.LLM`` for tests/test_vllm.py, in its own process (vLLM spawns processes).

    python tests/vllm_generate.py JOB.json OUT.json

JOB: ``{"runs": [{"model": DIR, "max_tokens": N, "requests": [{"prompt": str, "images": [png path, ...]}]}],
"engine": {extra vllm.LLM kwargs}}``. All runs share this process, one engine at a time (imports once).
A run with ``"expect_error": true`` only builds the engine and records the traceback (a load failure).
OUT: ``[[{"prompt_token_ids": [...], "token_ids": [...]} for each request] or {"error": traceback}, per run]``.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback


def main(job_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    results = []
    for run in job["runs"]:
        if run.get("expect_error"):
            try:
                LLM(model=run["model"], **job.get("engine", {}))
                results.append({"error": None})
            except Exception:  # noqa: BLE001 -- the test reads the message
                results.append({"error": traceback.format_exc()})
            gc.collect()
            continue
        llm = LLM(model=run["model"], **job.get("engine", {}))
        prompts = []
        for req in run["requests"]:
            images = [Image.open(p).convert("RGB") for p in req["images"]]
            prompts.append({"prompt": req["prompt"], "multi_modal_data": {"image": images}} if images
                           else {"prompt": req["prompt"]})
        params = SamplingParams(temperature=0.0, max_tokens=run["max_tokens"], ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([{"prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(o.outputs[0].token_ids)}
                        for o in outs])
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
