"""Test helper: an FP8 model against its unquantized twin on the same tokens: logits relative
error and greedy agreement (the FP8 model teacher-forced along the reference's greedy
continuation, so that one early flip does not hide the rest)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kestrel.layers import LinearBase, UnquantizedLinearMethod
from kestrel.layers.fp8 import dequantize_rows, quantize_rows
from kestrel.model_config import ModelConfig
from tests.models.paged_batch import PagedRunner


@dataclass
class Agreement:
    rel_error: float  # ||fp8 - ref|| / ||ref|| over every row's logits
    agree: float  # fraction of the new tokens whose argmax the FP8 model shares
    worst_margin: float  # largest reference top-1 - top-2 logit gap where they disagree (0: none)
    tokens: list[int]  # the reference's greedy tokens


def greedy(
    model: torch.nn.Module, config: ModelConfig, prompt: list[int], n: int
) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after `prompt` (one prefill, then decode steps through the paged cache)
    and the logits that chose them [n, vocab]."""
    runner = PagedRunner(model, config, [list(prompt) + [0] * n], block_size=16)
    seq = runner.seqs[0]
    rows = [runner.step([(0, len(prompt))])[0][-1:]]
    tokens: list[int] = []
    for i in range(n):
        tokens.append(int(rows[-1][-1].argmax()))
        if i + 1 < n:
            seq.token_ids[len(prompt) + i] = tokens[-1]
            rows.append(runner.step([(0, 1)])[0])
    return tokens, torch.cat(rows)


def teacher_forced(model: torch.nn.Module, config: ModelConfig, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one prefill of `ids`."""
    return PagedRunner(model, config, [ids], block_size=16).step([(0, len(ids))])[0]


def compare(
    reference: torch.nn.Module,
    fp8: torch.nn.Module,
    config: ModelConfig,
    prompt: list[int],
    n: int = 32,
) -> Agreement:
    tokens, ref_logits = greedy(reference, config, prompt, n)
    forced = teacher_forced(fp8, config, prompt + tokens[:-1])[len(prompt) - 1 :]  # [n, vocab]
    rel = ((forced - ref_logits).norm() / ref_logits.norm()).item()
    same = forced.argmax(-1) == torch.tensor(tokens)
    top2 = ref_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1])[~same]
    worst = margins.max().item() if margins.numel() else 0.0
    return Agreement(rel, same.float().mean().item(), worst, tokens)


class EmulatedFp8Method(UnquantizedLinearMethod):
    """The torch reference of Fp8LinearMethod for a whole model: the weight quantized per row
    and dequantized to float32 once, each input quantized per token and dequantized, then a
    float32 F.linear. An FP8 model must match its twin built with this to float32 rounding."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        layer.weight.data.copy_(dequantize_rows(*quantize_rows(layer.weight.data)))

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_deq = dequantize_rows(*quantize_rows(x)).to(x.dtype)
        return F.linear(x_deq, layer.weight, bias)


def emulated_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the unquantized `model` whose linear layers run EmulatedFp8Method."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, LinearBase):
            module.quant_method = EmulatedFp8Method()
            module.quant_method.process_weights_after_loading(module)
    return twin
