"""The merged model's forward pass, a layer at a time: mergekit's merge, never whole in memory.

`merged_logits` runs a mergekit config's merge on batches of token ids without building the
merged model. The model is a skeleton on the meta device; mergekit's own planner
(`MergePlanner`) gives one task per output tensor, and the pass goes

1. the embeddings (and any other weight outside the decoder layers but the final ones): their
   tasks run, the model runs on every batch up to its first decoder layer, which records its
   input and, for every layer, the arguments the model gives it (attention masks, sliding-window
   masks and rotary embeddings are the model's own);
2. each decoder layer in turn: its tensors are merged (one mergekit `Executor` per tensor, so
   one tensor of each input is read at a time), the layer runs on every batch, and is freed;
3. the final norm and head: merged, and the model runs once more on every batch with its
   layers replaced by the hidden states already computed, giving the logits.

Every value is the one `mergekit-yaml` writes (cast to the config's `out_dtype`), then cast to the
rehearsal's dtype, as loading the written model would. LoRA references are read through
`LoraTensorLoader` (no merged copy of the base on disk). Randomised methods (DARE) draw from a
generator seeded per tensor from (seed, tensor name), so the draw does not depend on the order in
which tensors are merged.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_collapse.errors import BadInputError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch of the pass: left-padded ids, their mask and positions, and how many final
    positions need logits."""

    ids: Any
    mask: Any
    positions: Any
    keep: int


@dataclass
class MergePlan:
    """A config's merge planned by mergekit: the output config, and each output tensor's task and
    out dtype."""

    config: Any  # transformers PretrainedConfig of the merged model
    tasks: dict[str, tuple[Any, str | None]]  # tensor name -> (mergekit task, out dtype)
    elementwise: bool = False  # each output element depends on the inputs' same element only


#: mergekit methods whose output element depends only on the inputs' values at that element (no
#: per-tensor choice: TIES, DARE and breadcrumbs sparsify by the tensor's magnitudes or a draw,
#: SLERP and model stock use whole-tensor norms and angles)
ELEMENTWISE_METHODS = ("linear", "task_arithmetic")


class _Stop(Exception):
    """Raised by the last layer's recorder: the capture pass needs nothing after it."""


# ---------------------------------------------------------------- planning


def plan_merge(merge: Any, *, trust_remote_code: bool = False,
               lora_cache: Path | None = None) -> MergePlan:
    """Plan `merge` with mergekit's planner, LoRA references served from their base's tensors.

    Args:
        merge: the mergekit MergeConfiguration (not modified).
        trust_remote_code: let transformers run the models' custom code.
        lora_cache: where mergekit may write a merged LoRA it has to (adapters other than plain
            LoRA: DoRA, saved modules); None: such adapters are refused.

    Raises:
        BadInputError: mergekit cannot plan this merge; a tokenizer section; several modules.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    if merge.tokenizer is not None or merge.tokenizer_source is not None:
        raise BadInputError("rehearsal does not support configs with a tokenizer section")
    merge = merge.model_copy(deep=True)  # mergekit's planner rewrites its config in place
    options = MergeOptions(lora_merge_cache=str(lora_cache) if lora_cache else None, quiet=True,
                           trust_remote_code=trust_remote_code)
    LoaderCache().setup(options=options)
    _serve_loras(merge, allow_cache=lora_cache is not None)
    try:
        arch = get_architecture_info(merge, options)
        if len(arch.modules) != 1:
            raise BadInputError(f"the streamed rehearsal merges one-module models; this one has "
                                f"{len(arch.modules)} ({', '.join(arch.modules)})")
        cfg_out = _model_out_config(merge, arch, trust_remote_code=trust_remote_code)
        planner = MergePlanner(merge, arch, options=options, out_model_config=cfg_out)
        # plan_in_memory() of mergekit 0.1.5 fails validating ReturnTensor(tensor_task=...)
        # ("Can't instantiate abstract class Task[Tensor]"); its own plan, run directly, is the same
        planner._plan()
    except (RuntimeError, ValueError, KeyError) as e:
        raise BadInputError(f"mergekit cannot plan this merge: {str(e).splitlines()[0]}") from None
    out_dtype = merge.out_dtype or merge.dtype
    tasks = {w.name: (task, w.force_dtype or out_dtype) for w, task in planner._tensors}
    return MergePlan(config=cfg_out, tasks=tasks,
                     elementwise=merge.merge_method in ELEMENTWISE_METHODS)


def _serve_loras(merge: Any, *, allow_cache: bool) -> None:
    """Put a `LoraTensorLoader` in mergekit's loader cache for each LoRA reference it describes."""
    from mergekit.io.tasks import LoaderCache

    from mergekit_collapse.models.loading import local_dir
    from mergekit_collapse.models.lora import LoraTensorLoader, fresh_lora_cache, lora_updates

    for ref in merge.referenced_models():
        if ref.lora is None:
            continue
        base = type(ref)(model=ref.model).lazy_loader(lazy_unpickle=False)
        updates = lora_updates(local_dir(ref.lora, what="LoRA adapter"),
                               set(base.index.tensor_paths))
        if updates is None:
            if not allow_cache:
                raise BadInputError(f"LoRA adapter {ref.lora} is not a plain LoRA (DoRA, saved "
                                    "modules or biases): the rehearsal cannot stream it")
            log.info("%s: not a plain LoRA; mergekit merges it into its LoRA cache", ref.lora)
            fresh_lora_cache([ref], Path(LoaderCache().lora_cache_dir))
            continue
        LoaderCache().loaders[ref] = LoraTensorLoader(base, updates)


# ---------------------------------------------------------------- the pass


def merged_logits(merge: Any, batches: list[Batch], *, dtype: Any, device: str = "cpu",
                  seed: int | None = 0, trust_remote_code: bool = False,
                  lora_cache: Path | None = None,
                  on_stage: Callable[[str], None] | None = None,
                  seconds: dict[str, float] | None = None) -> list[Any]:
    """The merged model's logits (float32, on the CPU) on each batch, the last `keep` positions.

    Args:
        merge: the mergekit MergeConfiguration, merged as written.
        batches: the inputs (see `Batch`); each batch is run as the whole model would run it.
        dtype: the torch dtype the merged weights are run in.
        device: where the merge arithmetic and the forward run ("cpu", "cuda", "cuda:1").
        seed: seed of randomised methods (per tensor; see the module docstring).
        trust_remote_code: let transformers run the models' custom code.
        lora_cache: where mergekit may merge adapters that are not plain LoRA.
        on_stage: called with "embeddings", "layer i/n", "head" as each stage starts.
        seconds: filled with {"merge": time in mergekit's tasks} (the rest is the forward).

    Raises:
        BadInputError: mergekit cannot plan or run the merge; an architecture the pass cannot
            stream (decoder layers that do not take and return hidden states).
    """
    import torch

    say = on_stage or (lambda _stage: None)
    try:
        plan = plan_merge(merge, trust_remote_code=trust_remote_code, lora_cache=lora_cache)
        model = _skeleton(plan.config, dtype, device, trust_remote_code)
        stages = _stages(model, plan)
        layers = model.get_decoder().layers
        block = max(p.numel() for layer in layers for p in layer.parameters())
        merger = _Merger(model, plan, dtype, device, seed, seconds if seconds is not None else {},
                         block=block)
        say("embeddings")
        merger.fill(stages["pre"])
        hidden, args = _capture(model, layers, batches)
        for i, layer in enumerate(layers):
            say(f"layer {i + 1}/{len(layers)}")
            merger.fill(stages[i])
            with torch.inference_mode():
                for b, (a, kw) in enumerate(args):
                    hidden[b] = _layer_output(layer(hidden[b], *a[i], **kw[i]), i)
            merger.free(stages[i])
        say("head")
        merger.fill(stages["post"])
        return _head(model, layers, batches, hidden)
    except BadInputError:  # ours, already one line (and a ValueError too)
        raise
    except (RuntimeError, ValueError) as e:
        raise BadInputError("mergekit cannot merge these models: "
                            f"{str(e).splitlines()[0]}") from None
    finally:
        _forget_loaders(merge)


def _skeleton(config: Any, dtype: Any, device: str, trust_remote_code: bool) -> Any:
    """The merged model's modules with every weight on the meta device (buffers real, on
    `device`)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code).eval()
    model.tie_weights()  # e.g. the head shares the embeddings: filled once, with them
    if device != "cpu":
        for name, buf in list(model.named_buffers()):
            set_module_tensor_to_device(model, name, device, value=buf)
    return model


def _stages(model: Any, plan: MergePlan) -> dict[Any, list[list[str]]]:
    """The weights each stage fills: "pre" (those of modules before the last layer's end, outside
    the layers: the embeddings), each layer's index, "post" (after the layers: the final norm, the
    head). Each entry is a group of parameter names that share one tensor: a head tied to the
    embeddings is filled with them, and kept.

    Raises:
        BadInputError: a planned tensor the model has not, or a weight no task fills.
    """
    layers = model.get_decoder().layers
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in layers]
    order = {n: i for i, n in enumerate(names.values())}
    end = max(i for n, i in order.items() if n.startswith(prefixes[-1]))
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    groups = list(tied.values())
    if unknown := sorted(set(plan.tasks) - {n for g in groups for n in g}):
        raise BadInputError(f"mergekit produced tensor '{unknown[0]}', which the model has not")
    if missing := [g[0] for g in groups if not any(n in plan.tasks for n in g)]:
        raise BadInputError(f"the in-memory merge left {len(missing)} tensors unset, "
                            f"e.g. {missing[0]}")
    stages: dict[Any, list[list[str]]] = {"pre": [], "post": [],
                                          **{i: [] for i in range(len(layers))}}
    for group in groups:
        layer = next((i for i, p in enumerate(prefixes) if group[0].startswith(p)), None)
        after = all(order[n.rpartition(".")[0]] > end for n in group)
        stages[layer if layer is not None else "post" if after else "pre"].append(group)
    return stages


class _Merger:
    """Runs mergekit's task of each tensor and puts the value into the skeleton.

    Under an element-wise method a tensor larger than the largest tensor of a decoder layer (the
    embeddings, an untied head) is merged a block of rows at a time, each input's rows read alone
    (`_Rows`): the merge's peak is then a layer's, not every input's copy of the embedding and
    the method's intermediates. The values are the same, element for element.
    """

    def __init__(self, model: Any, plan: MergePlan, dtype: Any, device: str, seed: int | None,
                 seconds: dict[str, float], block: int = 0):
        self.model, self.plan, self.dtype, self.device, self.seed = model, plan, dtype, device, seed
        self.seconds = seconds
        self.block = block  # elements per block of rows (0: whole tensors)

    def fill(self, groups: list[list[str]]) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from mergekit.io.tasks import LoaderCache

        t0 = time.perf_counter()
        for group in groups:
            name = next(n for n in group if n in self.plan.tasks)
            task, out_dtype = self.plan.tasks[name]
            inputs = _inputs(task) if self.plan.elementwise and self.block else None
            if inputs and inputs[1][0] * math.prod(inputs[1][1:]) > self.block:
                value = self._by_rows(task, name, out_dtype, *inputs)
            else:
                value = self._cast(self._run(task, name), out_dtype)
            for n in group:
                set_module_tensor_to_device(self.model, n, self.device, value=value)
        LoaderCache().flush_all()  # close the shards' maps: their pages leave this process
        self.seconds["merge"] = self.seconds.get("merge", 0.0) + time.perf_counter() - t0

    def free(self, groups: list[list[str]]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for group in groups:  # the layer's tensors go with their last reference (no gc pass)
            for n in group:
                set_module_tensor_to_device(self.model, n, "meta")

    def _run(self, task: Any, name: str) -> Any:
        """mergekit's task, on `device`, with the tensor's own seed."""
        import torch
        from mergekit.graph import Executor

        with torch.random.fork_rng(devices=[self.device] if self.device != "cpu" else []):
            if self.seed is not None:
                torch.manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
            ((_, value),) = Executor([task], math_device=self.device,
                                     storage_device=self.device).run(quiet=True)
        return value

    def _cast(self, value: Any, out_dtype: str | None) -> Any:
        """As `mergekit-yaml` writes it (`out_dtype`), then as the rehearsal runs it."""
        from mergekit.common import dtype_from_name

        if out_dtype:
            value = value.to(dtype_from_name(out_dtype))
        return value.to(device=self.device, dtype=self.dtype)

    def _by_rows(self, task: Any, name: str, out_dtype: str | None, models: list[Any],
                 shape: list[int]) -> Any:
        """The task run on blocks of rows, each input's loader serving only those rows."""
        import torch
        from mergekit.io.tasks import LoaderCache

        loaders = LoaderCache().loaders
        inner = {m: LoaderCache().get(m) for m in models}
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        step = max(1, self.block // max(1, math.prod(shape[1:])))
        log.debug("%s: merged %d rows at a time", name, step)
        try:
            for start in range(0, shape[0], step):
                rows = slice(start, min(start + step, shape[0]))
                for m in models:
                    loaders[m] = _Rows(inner[m], rows)
                out[rows] = self._cast(self._run(task, name), out_dtype)
        finally:
            loaders.update(inner)
        return out


class _Rows:
    """mergekit's loader interface over another loader: rows `rows` of each tensor asked for, read
    from its safetensors shard alone (the other rows are not read)."""

    def __init__(self, inner: Any, rows: slice):
        self.inner, self.rows = inner, rows
        self.index = inner.index

    def get_tensor(self, key: str, device: str = "cpu", aliases: list[str] | None = None,
                   raise_on_missing: bool = True) -> Any:
        from safetensors import safe_open

        with safe_open(_shard(self.inner, key), framework="pt", device=str(device)) as f:
            return f.get_slice(key)[self.rows.start : self.rows.stop]

    def flush(self) -> None:
        self.inner.flush()


def _shard(loader: Any, key: str) -> str:
    """The file holding tensor `key` of a mergekit loader (a `LoraTensorLoader`'s base's)."""
    index = getattr(loader, "base", loader).index
    return str(Path(index.base_path) / index.tensor_paths[key])


def _inputs(task: Any) -> tuple[list[Any], list[int]] | None:
    """The models `task` reads and the tensor's shape when it can be merged by rows: every input
    read by name from a safetensors shard, with the same shape, and no LoRA update on it."""
    from mergekit.io.tasks import LoaderCache, LoadTensor
    from safetensors import safe_open

    loads, todo = [], [task]
    while todo:
        t = todo.pop()
        if isinstance(t, LoadTensor):
            loads.append(t)
        else:
            todo += list(t.arguments().values())
    shapes = set()
    for load in loads:
        loader = LoaderCache().get(load.model)
        paths = loader.index.tensor_paths
        key = next((k for k in (load.tensor, *(load.aliases or ()), *(load.tied_names or ()))
                    if k in paths), None)
        if key is None or not paths[key].endswith(".safetensors") or \
                key in getattr(loader, "updates", {}):
            return None
        with safe_open(_shard(loader, key), framework="pt") as f:
            shapes.add(tuple(f.get_slice(key).get_shape()))
    if len(shapes) != 1:
        return None
    return [load.model for load in loads], list(shapes.pop())


def _capture(model: Any, layers: Any, batches: list[Batch]) -> tuple[list[Any], list[Any]]:
    """Run the model up to its first layer on each batch: the first layer's input, and per layer
    the positional and keyword arguments the model passes it."""
    import torch

    hidden: list[Any] = []
    args: list[tuple[list[Any], list[Any]]] = []
    for batch in batches:
        pos: list[Any] = [None] * len(layers)
        kws: list[Any] = [None] * len(layers)

        def recorder(i: int, pos: list[Any] = pos, kws: list[Any] = kws) -> Callable[..., Any]:
            def record(*a: Any, **kw: Any) -> Any:
                h = a[0] if a else kw.pop("hidden_states")
                pos[i], kws[i] = a[1:], kw
                if i == 0:
                    hidden.append(h)
                if i == len(layers) - 1:
                    raise _Stop
                return h
            return record

        with _replaced(layers, recorder), torch.inference_mode(), suppress(_Stop):
            model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                  use_cache=False, logits_to_keep=batch.keep)
        if len(hidden) != len(args) + 1 or any(k is None for k in kws):
            raise BadInputError("the streamed rehearsal cannot follow this model's forward pass")
        args.append((pos, kws))
    return hidden, args


def _head(model: Any, layers: Any, batches: list[Batch], hidden: list[Any]) -> list[Any]:
    """Run the final norm and head on each batch's last hidden states (the layers replaced)."""
    import torch

    out = []
    for batch, h in zip(batches, hidden, strict=True):
        def passthrough(i: int, h: Any = h) -> Callable[..., Any]:
            def forward(*a: Any, **kw: Any) -> Any:
                return h if i == len(layers) - 1 else (a[0] if a else kw["hidden_states"])
            return forward

        with _replaced(layers, passthrough), torch.inference_mode():
            logits = model(input_ids=batch.ids, attention_mask=batch.mask,
                           position_ids=batch.positions, use_cache=False,
                           logits_to_keep=batch.keep).logits
        out.append(logits.float().cpu())
    return out


@contextmanager
def _replaced(layers: Any, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Each layer's forward replaced by `make(i)` (on the instance), restored after."""
    for i, layer in enumerate(layers):
        layer.forward = make(i)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _layer_output(out: Any, i: int) -> Any:
    if isinstance(out, tuple):
        raise BadInputError(f"decoder layer {i} returns a tuple: the streamed rehearsal needs "
                            "transformers' layers that return their hidden states (transformers 5)")
    return out


def _forget_loaders(merge: Any) -> None:
    """Drop mergekit's loaders of this merge's inputs: the next pass reads the folders afresh."""
    from mergekit.io.tasks import LoaderCache

    for ref in merge.referenced_models():
        LoaderCache().loaders.pop(ref, None)


# ---------------------------------------------------------------- memory


def estimate_bytes(merge: Any, *, dtype_bytes: int, activations: int) -> dict[str, int]:
    """What the streamed pass holds at its peak, from the inputs' safetensors headers: the largest
    tensor merged at once (every input's copy, and mergekit's per-input intermediate such as the
    task vector, the result and a working copy: on SmolLM2 with 5 inputs the embedding's merge
    peaked at 10.6 copies, this counts 12; under an element-wise method, no more than a layer's
    largest tensor, as `_Merger` merges larger ones by rows), one merged layer, the weights kept
    outside the layers (embeddings, head), and `activations` bytes of hidden states and logits.

    Returns:
        {"tensor", "layer", "outside", "activations", "total"}: bytes.
    """
    from mergekit_collapse.models.loading import local_dir, tensor_shapes

    shapes = tensor_shapes(local_dir(merge.base_model.model if merge.base_model else
                                     merge.referenced_models()[0].model))
    numel = {n: math.prod(s) for n, s in shapes.items()}
    layer: dict[str, int] = {}
    outside, largest_in_layer = 0, 0
    for name, n in numel.items():
        head, sep, rest = name.partition(".layers.")
        index = rest.split(".")[0] if sep else ""
        if index.isdigit():
            layer[f"{head}.{index}"] = layer.get(f"{head}.{index}", 0) + n
            largest_in_layer = max(largest_in_layer, n)
        else:
            outside += n
    at_once = max(numel.values(), default=0)
    if merge.merge_method in ELEMENTWISE_METHODS and largest_in_layer:
        at_once = largest_in_layer
    inputs = len({(str(r.model), str(r.lora)) for r in merge.referenced_models()})
    merge_bytes = 2 if merge.dtype in ("bfloat16", "float16") else 4  # what mergekit computes in
    out = {"tensor": at_once * max(dtype_bytes, merge_bytes) * (2 * inputs + 2),
           "layer": max(layer.values(), default=0) * dtype_bytes,
           "outside": outside * dtype_bytes, "activations": activations}
    out["total"] = sum(out.values())
    return out
