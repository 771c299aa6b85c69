"""Offline generation demo that needs no downloads: a small random-weight Qwen2-shaped model
(config.json + the tiny test tokenizer, weights drawn with load_format="dummy") run through the
whole engine — native scheduler, paged KV cache, sampler, detokenizer. The text is gibberish
(random weights); the point is the pipeline and its throughput.

    python examples/offline_demo.py [--num-prompts 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kestrel import LLM, SamplingParams
from kestrel.testing.tiny_tokenizer import write_tiny_tokenizer


def write_demo_model(path: Path) -> None:
    vocab = write_tiny_tokenizer(path)
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "bos_token_id": 0,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_model(Path(tmp))
        llm = LLM(tmp, load_format="dummy")
        prompts = [f"Request {i}: tell me about kestrels" for i in range(args.num_prompts)]
        params = SamplingParams(
            temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, ignore_eos=True
        )
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for o in outputs[:3]:
        print(f"{o.prompt!r} -> {o.outputs[0].text[:60]!r}")
    print(
        f"{len(outputs)} requests, {tokens} output tokens in {elapsed:.2f} s "
        f"({tokens / elapsed:.0f} tok/s on {llm.engine.device})"
    )


if __name__ == "__main__":
    main()
