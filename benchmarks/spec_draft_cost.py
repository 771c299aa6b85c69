"""Draft-model speculation's mechanism cost (`spec_decode.py --draft-cost`): random weights make
acceptance meaningless, so this times the machinery instead, on a 7B-shape target with a
0.5B-shape draft (dummy weights, real shapes; the draft's vocab padded to the target's 152064
rows, as the tokenizer-free preset dirs cannot show the two share a tokenizer):

- `plain step`: one decode step of B requests without speculation (the k + 1 of them a
  speculative step must beat);
- `spec step`: one speculative step with drafting forced on (min_acceptance_rate 0): the
  draft's k chain steps, the target's verify step over k + 1 rows per request, and the draft's
  pass over those rows (its KV), plus the host work around them; `chain` / `mirror`: those two
  draft parts alone (timed with a device sync around each, in a separate pass);
- `break_even_acceptance_length`: spec step / plain step: the mean acceptance length (accepted
  drafts + 1) above which speculation is faster;
- `off-switch`: batch-1 time per output token with the default policy (drafts switched off
  for a sequence whose acceptance falls under min_acceptance_rate, probed every 16 steps)
  against no speculation: near-zero acceptance should cost at most a few percent.

    python benchmarks/spec_decode.py --draft-cost --k 2 4 --batch-size 1 8 --json draft.json
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, commit, device_name, print_table


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release() -> None:
    gc.collect()  # the previous engine's KV cache and graph pools must be gone first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _preset_dir(name: str, vocab_size: int | None = None) -> str:
    config = dict(SHAPES[name])
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    path = Path(tempfile.mkdtemp(prefix=f"kestrel-{name}-"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return str(path)


def _engine(target: str, spec: dict | None, batch: int, args):
    from kestrel import LLM

    return LLM(
        target,
        load_format="dummy",
        dtype=args.dtype or "bfloat16",
        max_num_seqs=max(batch, 1),
        max_model_len=args.input_len + args.steps * 80 + 256,
        speculative_config=json.dumps(spec) if spec is not None else None,
        enable_prefix_caching=False,
    ).engine


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 20000, (length,), generator=g).tolist() for _ in range(batch)]


def _step_times(engine, batch: int, args, tag: str) -> list[float]:
    """Seconds of each of args.steps engine steps once every request is in decode."""
    from kestrel import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, args.input_len, seed=len(tag))):
        engine.add_request(f"{tag}-{i}", p, params)
    for _ in range(args.input_len // 256 + 8):  # prefill (chunked or not) and the first tokens
        engine.step()
    times = []
    for _ in range(args.steps):
        _sync()
        t0 = time.perf_counter()
        engine.step()
        _sync()
        times.append(time.perf_counter() - t0)
    for i in range(batch):
        engine.abort_request(f"{tag}-{i}")
    return times


def _timed(fn, sink: list[float]):
    def wrapper(*a, **kw):
        _sync()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        _sync()
        sink.append(time.perf_counter() - t0)
        return out

    return wrapper


def _tpot(engine, args, tag: str) -> float:
    """Batch-1 time per output token over args.tpot_tokens tokens (after the first)."""
    from kestrel import SamplingParams

    prompt = _prompts(1, args.input_len, seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=args.tpot_tokens, ignore_eos=True)
    engine.add_request(tag, prompt, params)
    first = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first is None and out.outputs[0].token_ids:
                _sync()
                first = time.perf_counter()
    _sync()
    return (time.perf_counter() - first) / (args.tpot_tokens - 1)


def run_draft_cost(args) -> list[dict]:
    target = _preset_dir(args.target)
    draft = _preset_dir(args.draft, vocab_size=SHAPES[args.target]["vocab_size"])
    median = statistics.median
    results = []
    for batch in args.batch_size:
        plain = _engine(target, None, batch, args)
        plain_step = median(_step_times(plain, batch, args, f"p{batch}"))
        tpot_off = _tpot(plain, args, f"t{batch}") if batch == 1 else None
        del plain
        _release()
        for k in args.k:
            spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": k}
            always = {**spec, "min_acceptance_rate": 0, "disable_by_batch_size": None}
            forced = _engine(target, always, batch, args)
            spec_step = median(_step_times(forced, batch, args, f"s{batch}-{k}"))
            drafter = forced._drafter
            chain, mirror = [], []
            drafter.propose = _timed(drafter.propose, chain)
            drafter.mirror = _timed(drafter.mirror, mirror)
            _step_times(forced, batch, args, f"c{batch}-{k}")
            del forced, drafter
            _release()
            row = {
                "batch": batch,
                "k": k,
                "plain_step_ms": plain_step * 1e3,
                "k+1_plain_steps_ms": (k + 1) * plain_step * 1e3,
                "spec_step_ms": spec_step * 1e3,
                "chain_ms": median(chain) * 1e3 if chain else None,
                "mirror_ms": median(mirror) * 1e3 if mirror else None,
                "break_even_acceptance_length": spec_step / plain_step,
            }
            if batch == 1:
                auto = _engine(target, spec, 1, args)  # the default policy: off when rejected
                row["tpot_off_ms"] = tpot_off * 1e3
                row["tpot_auto_ms"] = _tpot(auto, args, f"a{k}") * 1e3
                row["auto_vs_off"] = row["tpot_auto_ms"] / row["tpot_off_ms"]
                del auto
                _release()
            results.append(row)
    cols = ["batch", "k", "plain_step_ms", "k+1_plain_steps_ms", "spec_step_ms", "chain_ms"]
    cols += ["mirror_ms", "break_even_acceptance_length", "tpot_off_ms", "tpot_auto_ms"]
    cols += ["auto_vs_off"]
    title = f"draft-model speculation cost  device={device_name()}  target={args.target}  "
    print_table(
        title + f"draft={args.draft}  commit={commit()}",
        cols,
        [[r.get(c) for c in cols] for r in results],
    )
    return results
