"""A tiny byte-level BPE tokenizer (512 tokens, ChatML template) trained on a built-in corpus.

Tests and tiny random models use it: `write_tiny_tokenizer(dir)` writes `tokenizer.json` and
`tokenizer_config.json` that both Kestrel and transformers' `AutoTokenizer` load. Training is
deterministic (same files byte for byte on every call) and takes a few milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

TINY_VOCAB_SIZE = 512
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so they get ids 0, 1, 2.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Splits text into words before BPE: contractions, letters with an optional leading space, digit
# groups of at most three, punctuation runs, and whitespace (a whitespace run keeps its last space
# for the next word).
_SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, like Qwen2's: a default system prompt when the chat does not start with one.
TINY_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] not in ['user', 'assistant'] %}\n"
    "        {{- raise_exception('Unsupported role ' + message['role'] + "
    "': use system (first message only), user or assistant') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small engine serves a language model: it reads
the prompt, fills the key and value cache, and then samples one token at a time until it meets a
stop token or the length limit. Batching many requests together keeps the accelerator busy.
Once upon a time there was a little kestrel that hovered over the fields, watching the grass for
mice. It was patient, and it waited for the wind to turn. "Where are you going?" asked the owl.
"I'm going home," said the kestrel, "and I'll be back tomorrow; we've got work to do."
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 512 1024 2048 4096 65536 3.14159 2.71828 1e-5 -7
Dates and times: 2024-05-17 12:30:00, 1999-12-31 23:59:59. Prices: $19.99, EUR 5,00, 15%.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]

for i in range(10):
    if i % 2 == 0:
        print(f"even {i}")
    else:
        print(f"odd {i}")

class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []

int main(int argc, char** argv) {
    std::vector<float> data(1024, 0.0f);
    for (size_t i = 0; i < data.size(); ++i) { data[i] = static_cast<float>(i) * 0.5f; }
    return 0;
}

{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "Fine!"}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;

Unicode: café, naïve, résumé, façade, Straße, smørrebrød, jalapeño, Ångström, coöperate.
Ελληνικά: καλημέρα κόσμε. Русский: привет, мир! Українська: добрий день.
中文：你好，世界。今天天气很好，我们去公园散步吧。语言模型生成文本。
日本語：こんにちは世界。今日はいい天気ですね。カタカナとひらがな。
한국어: 안녕하세요 세계. العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया।
Emoji: 😀 😃 😄 🚀 🌍 🔥 👍 🎉 ❤️ 👨‍👩‍👧‍👦 🇫🇷 ✨ ☕ 🐍 🦀
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π θ λ μ σ Ω ∂ ∇ ∈ ∀ ∃ → ⇒ ⊂ ∪ ∩ ×÷±
Whitespace:  two  spaces,   three   spaces,\ttabs\t\tand
blank lines


and a trailing line.
"""


def _build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": TINY_CHAT_TEMPLATE,
    }


def write_tiny_tokenizer(path: str | Path) -> int:
    """Train the tiny tokenizer and write transformers-compatible files into `path`.

    Writes `tokenizer.json` and `tokenizer_config.json` (eos `<|im_end|>`, no bos, pad
    `<|endoftext|>`, ChatML chat template); creates `path` if needed. Returns the vocabulary size
    including special tokens, always 512.
    """
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size != TINY_VOCAB_SIZE:  # the corpus must always yield enough merges
        raise RuntimeError(
            f"tiny tokenizer trained to {vocab_size} tokens, expected {TINY_VOCAB_SIZE}"
        )
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = _tokenizer_config(tokenizer)
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return vocab_size
