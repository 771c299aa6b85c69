"""Checkpoint tensor names -> model parameters, through a model's `packed_modules_mapping`.

A packed parameter fuses several checkpoint modules: with {"qkv_proj": ["q_proj", "k_proj",
"v_proj"]}, `model.layers.0.self_attn.k_proj.weight` loads into shard `param.shard_ids[1]` of
`model.layers.0.self_attn.qkv_proj.weight`. Names are matched by whole module components, so
the mapping is independent of where in the model the packed module lives.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import torch
from torch import nn


def map_checkpoint_name(
    name: str, packed_modules_mapping: Mapping[str, Sequence[str]]
) -> tuple[str, int | None]:
    """Checkpoint tensor name -> (parameter name here, index of the checkpoint module in its
    packed entry, or None when the tensor maps to a parameter of its own name)."""
    parts = name.split(".")
    for i in range(len(parts) - 2, -1, -1):  # module components, innermost first
        for packed, sources in packed_modules_mapping.items():
            if parts[i] in sources:
                mapped = [*parts[:i], packed, *parts[i + 1 :]]
                return ".".join(mapped), list(sources).index(parts[i])
    return name, None


def checkpoint_name(
    param_name: str,
    shard_id: Hashable | None,
    shard_ids: Sequence[Hashable],
    packed_modules_mapping: Mapping[str, Sequence[str]],
) -> str:
    """The checkpoint name of a parameter or of one of its shards (the inverse mapping)."""
    if shard_id is None:
        return param_name
    parts = param_name.split(".")
    for i in range(len(parts) - 2, -1, -1):
        sources = packed_modules_mapping.get(parts[i])
        if sources is not None and shard_id in shard_ids:
            index = list(shard_ids).index(shard_id)
            if index < len(sources):
                return ".".join([*parts[:i], sources[index], *parts[i + 1 :]])
    return f"{param_name} (shard {shard_id!r})"


def load_packed_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: Mapping[str, Sequence[str]],
    skip: Callable[[str], bool],
    what: str,
) -> set[str]:
    """Feed every (checkpoint name, full tensor) to its parameter's `weight_loader`.

    `skip(name)`: tensors to drop (recomputed buffers, a tied head). `what` names the model
    in the error. Returns the names of the parameters loaded. Raises ValueError, after
    consuming every tensor, listing unknown checkpoint names and the parameters (or packed
    shards, by checkpoint name) never loaded; a loader error is re-raised naming the tensor.
    """
    params = dict(model.named_parameters())
    loaded: set[tuple[str, Hashable | None]] = set()
    unknown: list[str] = []
    for ckpt_name, tensor in weights:
        if skip(ckpt_name):
            continue
        param_name, index = map_checkpoint_name(ckpt_name, packed_modules_mapping)
        param = params.get(param_name)
        if param is None:
            unknown.append(ckpt_name)
            continue
        shard_ids: Sequence[Hashable] = getattr(param, "shard_ids", ())
        try:
            if index is not None and index >= len(shard_ids):
                raise ValueError(
                    f"{param_name} has shards {list(shard_ids)}, but the packed module "
                    f"mapping puts this tensor at position {index}"
                )
            shard_id = None if index is None else shard_ids[index]
            param.weight_loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ValueError(f"cannot load checkpoint tensor {ckpt_name!r}: {exc}") from exc
        loaded.add((param_name, shard_id))
    missing = [
        checkpoint_name(name, shard, getattr(param, "shard_ids", ()), packed_modules_mapping)
        for name, param in params.items()
        for shard in getattr(param, "shard_ids", None) or (None,)
        if (name, shard) not in loaded
    ]
    if unknown or missing:
        raise ValueError(
            f"checkpoint does not match {what}: unexpected tensors {sorted(unknown)}; "
            f"parameters never loaded {missing}"
        )
    return {name for name, _ in loaded}
