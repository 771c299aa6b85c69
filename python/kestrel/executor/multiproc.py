"""Tensor parallelism across processes: rank 0 in the engine's process, ranks 1..N-1 in worker
processes (spawned), one model shard, KV cache and ModelRunner each.

Start-up (`start_tensor_parallel`): rank 0 opens a TCPStore on 127.0.0.1, spawns the workers,
and waits for each to check in while watching that they are alive (a worker that dies while
importing or connecting fails the start at once, not after a collective's timeout); then every
rank joins the default torch.distributed group (NCCL on CUDA, one GPU per rank; gloo on CPU)
and loads its shard (`load_model(..., tp_group=...)`). Each worker then reports its model's
shape, which must equal rank 0's (`MultiProcExecutor.check_workers`).

Steps (`MultiProcExecutor`, the `Executor` protocol of executor/uniproc.py): every call the
engine makes is sent to each worker first (a pickled (method, args) over its pipe, no reply)
and then run on rank 0's runner; the collectives inside the forward pass keep the ranks in step.
Workers of the first pipeline stage mirror add / remove / append in the same order (later
stages, which run `ModelRunner.forward_stage` and sample nothing, never get them), so their
input batches hand out the same slots; they run the same steps (the same StepInput, slots and prompt-logprob rows, so every rank
makes the same LM-head calls) and their sampled tokens are dropped: rank 0's are the engine's.
Grammar masks and per-request generators stay on rank 0 (workers sample with plain greedy
parameters, which only has to be cheap). Overlap scheduling and CUDA graphs are off with more
than one rank (the next steps: placeholders read on every rank from rank 0's samples, graphs
captured with the collectives inside).

Failure: a worker that raises sends its traceback and exits; a dead worker makes rank 0's next
collective fail (gloo: the connection closes; both backends: `COLLECTIVE_TIMEOUT_S`), and the
executor then raises `TensorParallelError` naming the rank, its exit code and its error.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from kestrel.layers.parallel import SINGLE_RANK, TensorParallelGroup, divide
from kestrel.layers.pipeline import SINGLE_STAGE, PipelineStage, layer_ranges

if TYPE_CHECKING:
    from kestrel.config import EngineConfig
    from kestrel.executor.step_input import StepInput
    from kestrel.model_config import ModelConfig
    from kestrel.runner.model_runner import ModelRunner, StepFuture, StepResult
    from kestrel.runner.prompt_logprobs import PromptLogprobRows
    from kestrel.sampling_params import SamplingParams
    from kestrel.structured import GrammarMask

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 120.0  # a collective waiting on a rank that is gone fails after this
START_TIMEOUT_S = 600.0  # workers importing torch and connecting (not loading: see check_workers)
_READY_KEY = "kestrel_tp_ready"


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed, died, or disagrees with rank 0."""


@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    config: EngineConfig
    model_path: str
    device_type: str
    rank: int
    size: int
    store_port: int
    cpu_threads: int

    @property
    def later_stage(self) -> bool:
        """A pipeline stage after the first: its layers only, no logits, no sampling state."""
        return self.rank >= self.config.tensor_parallel_size


def _model_signature(mc: ModelConfig) -> tuple[Any, ...]:
    return (
        mc.architecture,
        mc.num_hidden_layers,
        mc.hidden_size,
        mc.num_attention_heads,
        mc.num_key_value_heads,
        mc.head_dim,
        mc.vocab_size,
    )


def _worker_device(device_type: str, rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _join_group(
    backend: str, store: Any, rank: int, config: EngineConfig
) -> tuple[TensorParallelGroup, PipelineStage]:
    """Joins the default group of tp x pp ranks (rank = stage * tp + tp_rank); returns this
    rank's tensor-parallel group (its stage's tp ranks) and pipeline stage."""
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group(backend, store=store, rank=rank, world_size=tp * pp, timeout=timeout)
    group = SINGLE_RANK
    if tp > 1 and pp == 1:
        group = TensorParallelGroup.from_process_group()
    elif tp > 1:
        mine = None
        for s in range(pp):  # every rank creates every group, in the same order
            ranks = list(range(s * tp, (s + 1) * tp))
            made = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine = made
        group = TensorParallelGroup(rank=rank % tp, size=tp, process_group=mine)
    return group, PipelineStage(rank=rank // tp, size=pp, tp_rank=rank % tp, tp_size=tp)


def _worker_main(spec: _WorkerSpec, conn: Any) -> None:
    """A worker process: join the group, load this rank's shard, then run what rank 0 sends."""
    from kestrel.loader import load_model
    from kestrel.ops.kv_quant import resolve_kv_cache_dtype
    from kestrel.runner.memory import plan_num_kv_blocks
    from kestrel.runner.model_runner import ModelRunner
    from kestrel.sampling_params import SamplingParams

    try:
        torch.set_num_threads(spec.cpu_threads)
        device = _worker_device(spec.device_type, spec.rank)
        store = dist.TCPStore(
            "127.0.0.1", spec.store_port, spec.size, is_master=False,
            timeout=timedelta(seconds=START_TIMEOUT_S),
        )  # fmt: skip
        store.add(_READY_KEY, 1)
        backend = "nccl" if device.type == "cuda" else "gloo"
        group, stage = _join_group(backend, store, spec.rank, spec.config)
        cfg = spec.config
        model, mc = load_model(
            spec.model_path, cfg.dtype, device, cfg.load_format,
            seed=cfg.seed, quantization=cfg.quantization, tp_group=group, pp_stage=stage,
        )  # fmt: skip
        dtype = next(model.parameters()).dtype
        runner = ModelRunner(
            model, mc, device=device, dtype=dtype, block_size=cfg.block_size, seed=cfg.seed,
            max_num_seqs=cfg.max_num_seqs,
            kv_cache_dtype=resolve_kv_cache_dtype(cfg.kv_cache_dtype, dtype),
        )  # fmt: skip
        conn.send(("ready", _model_signature(mc)))
        greedy = SamplingParams(temperature=0.0)
        while True:
            method, args = conn.recv()
            if method == "shutdown":
                break
            if method == "plan_num_kv_blocks":
                conn.send(("plan", plan_num_kv_blocks(cfg, runner, *args)))
            elif spec.later_stage and method == "execute":
                runner.forward_stage(args[0])  # a later stage: its layers, no sampling
            elif method == "add_sequence":
                key, _params, prompt_ids, eos, output_ids = args
                runner.add_sequence(key, greedy, prompt_ids, None, eos, output_ids)
            elif method == "execute":
                runner.execute(*args)
            else:
                getattr(runner, method)(*args)
    except EOFError:
        pass  # rank 0's process is gone
    except BaseException:  # noqa: BLE001 - reported to rank 0, then this process exits
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclasses.dataclass
class _Worker:
    rank: int
    process: Any  # multiprocessing.Process
    conn: Any  # multiprocessing.connection.Connection
    error: str | None = None

    def describe(self) -> str:
        code = self.process.exitcode
        state = "running" if code is None else f"exited with code {code}"
        return f"tensor-parallel worker rank {self.rank} ({state})" + (
            f": {self.error.strip()}" if self.error else ""
        )


@dataclasses.dataclass
class TensorParallelWorld:
    """Rank 0's view: its group and the worker processes of ranks 1..N-1."""

    group: TensorParallelGroup
    workers: list[_Worker]
    pp: PipelineStage = SINGLE_STAGE  # rank 0's pipeline stage


def _cpu_threads_per_rank(size: int) -> int:
    from kestrel.runner.cpu_threads import cpu_thread_count

    return max(1, cpu_thread_count() // size)


def check_parallel_sizes(config: EngineConfig, model_config: ModelConfig) -> None:
    """The model splits into tensor_parallel_size x pipeline_parallel_size ranks (checked
    before any worker starts): the layers over the stages, the heads over the tensor-parallel
    ranks (KV heads split evenly, or replicated evenly when there are fewer than ranks)."""
    tp, mc = config.tensor_parallel_size, model_config
    layer_ranges(mc.num_hidden_layers, config.pipeline_parallel_size)
    divide(mc.num_attention_heads, tp, "num_attention_heads")
    kv = mc.num_key_value_heads
    if (tp >= kv and tp % kv != 0) or (tp < kv and kv % tp != 0):
        raise ValueError(
            f"num_key_value_heads={kv} cannot be split or replicated evenly over the "
            f"tensor-parallel size {tp}"
        )


def start_tensor_parallel(
    config: EngineConfig, model_path: str, device: torch.device, model_config: ModelConfig
) -> TensorParallelWorld:
    """Spawns ranks 1..N-1 and joins rank 0 (this process) to the group (see the module
    docstring); raises ValueError when the model cannot be split so (before any worker starts)
    and TensorParallelError when a worker does not make it."""
    check_parallel_sizes(config, model_config)
    size = config.tensor_parallel_size * config.pipeline_parallel_size
    if dist.is_initialized():
        raise TensorParallelError(
            "torch.distributed is already initialized in this process: one tensor-parallel "
            "engine per process (shut the other one down first)"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count < size:
            raise ValueError(
                f"tensor_parallel_size x pipeline_parallel_size = {size} ranks need {size} GPUs "
                f"(one per rank); this machine has {count}"
            )
        torch.cuda.set_device(0)
    threads = _cpu_threads_per_rank(size) if device.type == "cpu" else 1
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks share one host (127.0.0.1)
    store = dist.TCPStore(
        "127.0.0.1", 0, size, is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=START_TIMEOUT_S),
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    workers = []
    for rank in range(1, size):
        parent, child = ctx.Pipe()
        spec = _WorkerSpec(config, model_path, device.type, rank, size, store.port, threads)
        process = ctx.Process(
            target=_worker_main, args=(spec, child), name=f"kestrel-tp{rank}", daemon=True
        )
        process.start()
        child.close()
        workers.append(_Worker(rank, process, parent))
    world = TensorParallelWorld(TensorParallelGroup(), workers)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while store.add(_READY_KEY, 0) < size - 1:
            _raise_if_dead(world, "while starting")
            if time.monotonic() > deadline:
                raise TensorParallelError(
                    f"tensor-parallel workers did not start in {START_TIMEOUT_S} s"
                )
            time.sleep(0.02)
        if device.type == "cpu":
            torch.set_num_threads(threads)
        backend = "nccl" if device.type == "cuda" else "gloo"
        world.group, world.pp = _join_group(backend, store, 0, config)
    except BaseException:
        stop_tensor_parallel(world, join_s=5.0)
        raise
    logger.info(
        "%d ranks: tensor parallel %d x pipeline stages %d (%s)", size,
        config.tensor_parallel_size, config.pipeline_parallel_size,
        "nccl" if device.type == "cuda" else "gloo",
    )  # fmt: skip
    return world


def _collect_errors(world: TensorParallelWorld) -> None:
    for w in world.workers:
        try:
            while w.error is None and w.conn.poll():
                kind, payload = w.conn.recv()
                if kind == "error":
                    w.error = payload
        except (EOFError, OSError):
            pass


def _raise_if_dead(world: TensorParallelWorld, when: str) -> None:
    dead = [w for w in world.workers if w.process.exitcode is not None]
    if dead:
        _collect_errors(world)
        raise TensorParallelError(f"{dead[0].describe()} {when}")


def stop_tensor_parallel(world: TensorParallelWorld, join_s: float = 10.0) -> None:
    """Stops the workers (shutdown message, then terminate) and leaves the group."""
    for w in world.workers:
        try:
            w.conn.send(("shutdown", ()))
        except OSError:
            pass
    for w in world.workers:
        w.process.join(join_s)
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(join_s)
        w.conn.close()
    if dist.is_initialized():
        dist.destroy_process_group()


class MultiProcExecutor:
    """The `Executor` of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, runner: ModelRunner, world: TensorParallelWorld) -> None:
        self.runner = runner
        self.world = world
        self._closed = False

    # ---- start-up ---------------------------------------------------------------------------

    def _reply(self, w: _Worker, expected: str, what: str) -> Any:
        while not w.conn.poll(0.05):
            _raise_if_dead(self.world, what)
        try:
            kind, payload = w.conn.recv()
        except EOFError:
            _raise_if_dead(self.world, what)
            raise
        if kind == "error":
            w.error = payload
            raise TensorParallelError(f"{w.describe()} {what}")
        assert kind == expected, (kind, expected)
        return payload

    def check_workers(self, model_config: ModelConfig) -> None:
        """Waits for every worker's shard; each must be of the model rank 0 loaded."""
        mine = _model_signature(model_config)
        for w in self.world.workers:
            theirs = self._reply(w, "ready", "while loading the model")
            if tuple(theirs) != mine:
                raise TensorParallelError(
                    f"tensor-parallel rank {w.rank} loaded a different model {theirs}; rank 0 "
                    f"has {mine}"
                )

    def plan_num_kv_blocks(self, config: EngineConfig, max_model_len: int) -> int:
        """The KV blocks every rank can hold: the minimum over the ranks' plans (CUDA: each
        profiles its own card, together, since the profile step runs the collectives)."""
        from kestrel.runner.memory import plan_num_kv_blocks

        self._send("plan_num_kv_blocks", (max_model_len,))
        plans = [plan_num_kv_blocks(config, self.runner, max_model_len)]
        plans += [self._reply(w, "plan", "while sizing the KV cache") for w in self.world.workers]
        if len(set(plans)) > 1:
            logger.info("KV blocks per rank %s: using the minimum", plans)
        return min(plans)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send("allocate_kv_cache", (num_blocks,))
        self.runner.allocate_kv_cache(num_blocks)

    # ---- the Executor protocol ----------------------------------------------------------------

    def _send(self, method: str, args: tuple[Any, ...], first_stage: bool = False) -> None:
        """(method, args) to every worker; `first_stage`: only to the first pipeline stage's
        (the sampling state's calls: later stages hold none)."""
        if self._closed:
            raise TensorParallelError("the tensor-parallel executor is shut down")
        _raise_if_dead(self.world, "before this step")
        tp_size = self.world.pp.tp_size
        for w in self.world.workers:
            if first_stage and w.rank >= tp_size:
                continue
            try:
                w.conn.send((method, args))
            except OSError as exc:
                _raise_if_dead(self.world, "(its pipe closed)")
                raise TensorParallelError(f"{w.describe()}: {exc}") from exc

    def _on_rank0(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # a collective that failed: say which rank is gone
            time.sleep(0.1)  # let a dying worker's exit code and error arrive
            _raise_if_dead(self.world, f"during a step ({exc})")
            raise

    def add_sequence(
        self,
        key: Hashable,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        generator: torch.Generator | None,
        eos_token_ids: Sequence[int],
        output_ids: Sequence[int] = (),
    ) -> int:
        self._send(
            "add_sequence",
            (key, None, list(prompt_ids), tuple(eos_token_ids), list(output_ids)),
            first_stage=True,
        )
        return self.runner.add_sequence(
            key, params, prompt_ids, generator, eos_token_ids, output_ids
        )

    def remove_sequence(self, key: Hashable) -> int:
        self._send("remove_sequence", (key,), first_stage=True)
        return self.runner.remove_sequence(key)

    def append_tokens(self, slots: Sequence[int] | np.ndarray, tokens: np.ndarray) -> None:
        self._send("append_tokens", (np.asarray(slots), np.asarray(tokens)), first_stage=True)
        self.runner.append_tokens(slots, tokens)

    def execute(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | None = None,
    ) -> StepResult:
        self._send("execute", (_detached(step), list(slots), prompt_rows))
        return self._on_rank0(lambda: self.runner.execute(step, slots, prompt_rows, grammar_mask))

    def launch(
        self,
        step: StepInput,
        slots: Sequence[int],
        prompt_rows: PromptLogprobRows | None = None,
        grammar_mask: GrammarMask | Callable[[], GrammarMask | None] | None = None,
    ) -> StepFuture:
        self._send("execute", (_detached(step), list(slots), prompt_rows))
        return self._on_rank0(lambda: self.runner.launch(step, slots, prompt_rows, grammar_mask))

    def shutdown(self) -> None:
        """Stops the workers and leaves the group (idempotent)."""
        if not self._closed:
            self._closed = True
            stop_tensor_parallel(self.world)


def _detached(step: Any) -> Any:
    """A StepInput that owns its arrays (the scheduler's views are only valid until the next
    schedule(); pickling copies them anyway, this also turns a SchedulerOutput into one)."""
    from kestrel.executor.step_input import StepInput

    if not isinstance(step, StepInput):
        step = StepInput.from_scheduler_output(step)
    return step
