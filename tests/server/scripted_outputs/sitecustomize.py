"""Loaded by the server processes of test_tool_calling.py (this folder leads their PYTHONPATH).

The tiny random model cannot be made to write tool calls, so the API process rewrites its
chat outputs: a request whose prompt holds `SCRIPT=<key>` gets the text
KESTREL_TEST_SCRIPTS[key] instead of the model's, a few characters per engine output (the rest
with the final one), and finish_reason "stop"; so the server's parsing of every tool_choice
can be tested on scripted text. Prompts without a script get the model's own (constrained)
output.
"""

import json
import os
import re

_SCRIPTS = json.loads(os.environ.get("KESTREL_TEST_SCRIPTS", "{}"))
_CHARS_PER_OUTPUT = 3

if _SCRIPTS:
    from tokenizers import Tokenizer

    from kestrel_server import chat, common

    _real_merged = common.merged_outputs
    _tokenizers = {}

    def _script_of(output):
        path = os.environ["KESTREL_TEST_TOKENIZER"]
        tokenizer = _tokenizers.get(path) or _tokenizers.setdefault(path, Tokenizer.from_file(path))
        match = re.search(r"SCRIPT=(\w+)", tokenizer.decode(output.prompt_token_ids))
        return None if match is None else _SCRIPTS[match.group(1)]

    async def _scripted(streams, metrics):
        sent = {}
        async for index, output in _real_merged(streams, metrics):
            script = _script_of(output)
            if script is not None:
                for c in output.outputs:
                    start = sent.get((index, c.index), 0)
                    end = len(script) if c.finish_reason else start + _CHARS_PER_OUTPUT
                    c.text_delta = script[start:end]
                    c.text = script[:end]
                    sent[(index, c.index)] = end
                    if c.finish_reason == "length":
                        c.finish_reason = "stop"
            yield index, output

    common.merged_outputs = _scripted
    chat.merged_outputs = _scripted
