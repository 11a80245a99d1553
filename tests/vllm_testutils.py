"""Helpers of the vLLM connector tests (tests/vllm_connector): one request served through `vllm.LLM`, its stats, tokens and
logprobs. Imported only where vLLM is installed (`make test-vllm`)."""
from vllm import SamplingParams

NEW = 6  # tokens generated per request
LOGPROB_ATOL = 1e-3  # fp32: vLLM's prefill in one pass vs the same layers run on row subsets
OFF = {"reuse": False, "save": False}  # vLLM's own prefill, nothing kept as a donor


def serve(llm, ids, salt, options=None, n=NEW):
    """Serve prompt token ids under `cache_salt` salt with greedy decoding; the output gains `stats` (the
    connector's kv_transfer_params["semshare"]), `tokens` and `logprobs` (of the chosen tokens)."""
    return serve_together(llm, [(ids, salt, options)], n)[0]


def serve_together(llm, requests, n=NEW):
    """`serve` for several (ids, salt, options) requests in one `generate` call: admitted in the same step."""
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=0,
                             extra_args={"kv_transfer_params": {"semshare": options or {}}})
              for _, _, options in requests]
    outs = llm.generate([{"prompt_token_ids": list(ids), "cache_salt": salt} for ids, salt, _ in requests], params,
                        use_tqdm=False)
    for out in outs:
        out.stats = (out.kv_transfer_params or {})["semshare"]
        out.tokens = list(out.outputs[0].token_ids)
        out.logprobs = [d[t].logprob for d, t in zip(out.outputs[0].logprobs, out.tokens)]
    return outs
