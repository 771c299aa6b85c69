"""Loaded by the server processes of test_engine_death.py (this folder leads their PYTHONPATH),
the engine core process among them: the engine's step raises a device-like error from step
KESTREL_TEST_FAIL_AT_STEP on (`step_states` is the step of both `LLMEngine.step` and the core)."""

import os

_FAIL_AT = int(os.environ.get("KESTREL_TEST_FAIL_AT_STEP", "0"))

if _FAIL_AT > 0:
    from kestrel.engine import llm_engine

    _real_step = llm_engine.LLMEngine.step_states
    _steps = [0]

    def _failing_step(self):
        _steps[0] += 1
        if _steps[0] >= _FAIL_AT:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return _real_step(self)

    llm_engine.LLMEngine.step_states = _failing_step
