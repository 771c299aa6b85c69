"""N-gram speculative decoding on input-grounded prompts: speedup over no speculation, mean
acceptance length, and whether the greedy outputs are identical (they must be).

The prompts ask a real chat model to work on a text it is given (summarise it, edit a code
file, extract fields), so its answers copy spans of the prompt that prompt lookup can draft.
Each configuration runs the same prompts in its own engine, one after the other, in one
process; a warm-up pass per engine comes first.

    python benchmarks/spec_decode.py                       # the default model (SmolLM2-135M)
    python benchmarks/spec_decode.py --model M.gguf --batch-size 1 64 --k 2 4 --json spec.json

`--draft-cost` times the draft-model proposer's machinery instead (7B-shape target, 0.5B-shape
draft, dummy weights; `benchmarks/spec_draft_cost.py` says what each column is):

    python benchmarks/spec_decode.py --draft-cost --k 2 4 --batch-size 1 8 --json draft.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, device_name, print_table

_CODE = Path(__file__).with_name("common.py").read_text().split("\n\n\n")[1][:1800]
_TEXT = (
    "The Kestrel is a small falcon found across Europe, Asia and Africa. It hunts by hovering "
    "in place over open fields, facing into the wind, and dropping onto voles, mice and large "
    "insects. Kestrels nest in tree holes, on cliff ledges and on buildings, and they readily "
    "take to nest boxes. A clutch holds three to six eggs, incubated for about four weeks, "
    "mostly by the female. Populations declined in many countries in the late twentieth "
    "century as farming changed, but the species remains widespread and is listed as of "
    "least concern. In cities, kestrels nest on towers and bridges and hunt along railway "
    "embankments and road verges, where small mammals are common."
)
_RECORD = (
    "Order 20931 was placed on 14 March 2026 by Dana Whitfield (dana.whitfield@example.com, "
    "phone +44 20 7946 0958) for 3 units of part KX-220 at 41.50 EUR each, shipping to 18 "
    "Harbour Road, Leith, Edinburgh EH6 6LU, United Kingdom, express delivery, paid by card."
)
TASKS = [
    f"Summarise the following text in a few sentences, reusing its wording:\n\n{_TEXT}",
    (
        "Rewrite this Python code with every function argument named `args` renamed to "
        f"`options`. Output the whole code, unchanged otherwise.\n\n```python\n{_CODE}\n```"
    ),
    (
        "Extract the order number, date, customer name, email, phone, part, quantity, unit "
        f"price, address and delivery type from this record as JSON:\n\n{_RECORD}"
    ),
    f"Repeat the following text exactly, then give it a title:\n\n{_TEXT}",
]


def _run(model: str, spec: dict | None, batch: int, max_tokens: int, args) -> dict:
    from kestrel import LLM, SamplingParams

    kwargs = {"max_num_seqs": batch, "max_model_len": 4096}
    if spec is not None:
        kwargs["speculative_config"] = json.dumps(spec)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    llm = LLM(model, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    convs = [[{"role": "user", "content": t}] for t in TASKS]
    prompts = [convs[i % len(convs)] for i in range(max(batch, len(convs)))]
    llm.chat(prompts[: len(convs)], params, use_tqdm=False)  # warm-up (graphs, caches)
    before = dict(llm.engine.stats())
    rows = []
    # Batch 1: each task alone (the latency case); batch B: B conversations at once.
    groups = [[p] for p in convs] if batch == 1 else [prompts]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for group in groups:
        rows.extend(llm.chat(group, params, use_tqdm=False))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = llm.engine.stats()
    tokens = [list(r.outputs[0].token_ids) for r in rows]

    def delta(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    drafts, accepted = delta("spec_decode_num_drafts"), delta("spec_decode_num_accepted_tokens")
    result = {
        "config": "off" if spec is None else f"ngram k={spec['num_speculative_tokens']}",
        "batch": batch,
        "output_tokens": sum(len(t) for t in tokens),
        "seconds": seconds,
        "tok_per_s": sum(len(t) for t in tokens) / seconds,
        "drafts": drafts,
        "draft_tokens": delta("spec_decode_num_draft_tokens"),
        "accepted": accepted,
        "mean_acceptance_length": 1.0 + accepted / drafts if drafts else None,
        "skipped_steps": delta("spec_decode_num_skipped_steps"),
        "tokens": tokens,
    }
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: Kestrel's default model")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1])
    ap.add_argument("--k", type=int, nargs="+", default=[4], help="num_speculative_tokens")
    ap.add_argument("--prompt-lookup-max", type=int, default=5)
    ap.add_argument("--prompt-lookup-min", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--json", default=None)
    cost = ap.add_argument_group("--draft-cost", "the draft-model proposer's mechanism cost")
    cost.add_argument("--draft-cost", action="store_true")
    cost.add_argument("--target", default="qwen2.5-7b", help="a preset shape (dummy weights)")
    cost.add_argument("--draft", default="qwen2.5-0.5b", help="a preset shape (dummy weights)")
    cost.add_argument("--input-len", type=int, default=512)
    cost.add_argument("--steps", type=int, default=40, help="timed engine steps per config")
    cost.add_argument("--tpot-tokens", type=int, default=256, help="batch-1 off-switch run")
    args = ap.parse_args(argv)
    if args.draft_cost:
        from spec_draft_cost import run_draft_cost

        results = run_draft_cost(args)
        if args.json:
            payload = {"device": device_name(), "commit": commit(), "results": results}
            Path(args.json).write_text(json.dumps(payload, indent=2))
        return
    model = args.model
    if model is None:
        from kestrel.default_model import default_model_path

        model = str(default_model_path())
    results = []
    for batch in args.batch_size:
        base = _run(model, None, batch, args.max_tokens, args)
        results.append(base)
        for k in args.k:
            spec = {
                "method": "ngram",
                "num_speculative_tokens": k,
                "prompt_lookup_max": args.prompt_lookup_max,
                "prompt_lookup_min": args.prompt_lookup_min,
            }
            r = _run(model, spec, batch, args.max_tokens, args)
            r["speedup"] = r["tok_per_s"] / base["tok_per_s"]
            r["identical_to_off"] = r["tokens"] == base["tokens"]
            results.append(r)
    cols = ["config", "batch", "output_tokens", "tok_per_s", "mean_acceptance_length"]
    cols += ["speedup", "identical_to_off", "skipped_steps"]
    table = [[r.get(c) for c in cols] for r in results]
    title = f"speculative decoding  device={device_name()}  model={Path(model).name}  "
    print_table(title + f"commit={commit()}", cols, table)
    if args.json:
        for r in results:
            r.pop("tokens")
        payload = {"device": device_name(), "commit": commit(), "model": model, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
