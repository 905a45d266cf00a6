"""The package `asymrnr_fx.export` writes, and the module `load_exported` returns.

One `.pt2` archive (torch's PT2 archive format):
- `data/aotinductor/segmentNNN/`: one AOTInductor program per segment variant;
- `extra/asymrnr/manifest.json`: versions, device, dtype, input shapes, steps served, the config,
  each program's variant (readable with any zip tool);
- `data/asymrnr/state.pkl`: the wiring between programs, the reducers' sites and the cache span,
  as data (`wiring.Wiring`, no FX code), pickled without the runtime;
- `data/asymrnr/weights.safetensors`: the weights the programs take as inputs.
Loading unpickles `state.pkl` and loads shared libraries: load only packages you trust.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import diffusers
import safetensors.torch
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import fx

from . import pipeline_hook, span
from .errors import ExportError
from .runtime import AsymRnRRuntime
from .wiring import Wiring

FORMAT = 1
MANIFEST = "asymrnr/manifest.json"  # under the archive's extra/ folder
STATE = "data/asymrnr/state.pkl"
WEIGHTS = "data/asymrnr/weights.safetensors"


def _version() -> str:
    try:
        return metadata.version("asymrnr_fx")
    except metadata.PackageNotFoundError:
        return "unknown"


def _describe(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def manifest(model: torch.nn.Module, config: Any, example_inputs: dict, num_steps: int, trace: Any,
             sources: list[tuple]) -> dict:
    """What the package serves and was built with (JSON)."""
    inputs = [{"path": list(s[1:]), **_describe(t)} for s, t in zip(sources, trace.graph_inputs) if s[0] == "input"]
    latent = trace.graph_inputs[trace.compiled.latent_index]
    return {
        "format": FORMAT,
        "versions": {"asymrnr_fx": _version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
        "device": str(latent.device),
        "dtype": str(latent.dtype).removeprefix("torch."),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": json.loads(json.dumps(dict(getattr(model, "config", {})), default=str)),
        "num_steps": num_steps,
        "config": repr(config),
        "grid": list(trace.rt.info.grid),
        "inputs": inputs,
        "arguments": sorted(example_inputs),
        "constants": {k: repr(v) for k, v in example_inputs.items() if not _holds_tensor(v) and k != "return_dict"},
        "programs": {name: {"variant": repr(key[1]), "inputs": [list(t.shape) for t in args if isinstance(t, torch.Tensor)]}
                     for name, (key, _, args) in trace.records.items()},
    }


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in torch.utils._pytree.tree_leaves(value))


def _as_data(obj: Any) -> Any:
    """Segment-calling GraphModules as `Wiring`s, the cache span's group included."""
    if isinstance(obj, fx.GraphModule):
        return Wiring(obj, _as_data)
    if isinstance(obj, span.CachedSpan):
        obj.gm = _as_data(obj.gm)
    return obj


def state_of(trace: Any, sources: list[tuple], forward: list[str]) -> dict:
    """What the loaded module needs besides programs and weights (the trace's objects change)."""
    rt, compiled = trace.rt, trace.compiled
    compiled.top = _as_data(compiled.top)
    return {
        "compiled": compiled, "keys": {name: rec[0] for name, rec in trace.records.items()},
        "sources": sources, "forward": forward, "info": rt.info, "config": rt.config,
        "active_sites": rt.active_sites, "symmetric_points": rt.symmetric_points,
        "strides": [tuple(t.stride()) for t in trace.graph_inputs],  # the programs assume them
    }


class _Pickler(pickle.Pickler):
    """Leaves out the runtime (the loaded module makes its own) and the segments' graphs (their
    programs are compiled)."""

    def __init__(self, f: io.BytesIO, rt: AsymRnRRuntime) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.rt = rt

    def persistent_id(self, obj: Any) -> str | None:
        if obj is self.rt:
            return "runtime"
        return "graph" if isinstance(obj, fx.GraphModule) else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, rt: AsymRnRRuntime) -> None:
        super().__init__(f)
        self.rt = rt

    def persistent_load(self, pid: str) -> Any:
        return {"runtime": self.rt, "graph": None}[pid]


def write(path: Path, programs: dict[str, list], weights: dict[str, torch.Tensor], state: dict, manifest: dict) -> None:
    from torch.export.pt2_archive._package import PT2ArchiveWriter, _package_aoti_files

    buf = io.BytesIO()
    pickle.dump(state["config"], buf)  # first: the runtime the rest is unpickled against
    _Pickler(buf, state["compiled"].rt).dump(state)
    tensors = {k: v.contiguous() for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with PT2ArchiveWriter(str(path)) as archive:
        _package_aoti_files(archive, programs, pickle_protocol=pickle.DEFAULT_PROTOCOL)
        archive.write_string(f"extra/{MANIFEST}", json.dumps(manifest, indent=1))
        archive.write_bytes(STATE, buf.getvalue())
        archive.write_bytes(WEIGHTS, safetensors.torch.save(tensors))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[Any]:
    from torch.export.pt2_archive._package import PT2ArchiveReader

    if not path.is_file():
        raise FileNotFoundError(f"no asymrnr package at {str(path)!r}")
    try:
        with PT2ArchiveReader(str(path)) as archive:
            yield archive
    except (RuntimeError, zipfile.BadZipFile, KeyError, pickle.UnpicklingError, UnicodeDecodeError, EOFError) as err:
        if isinstance(err, ExportError):
            raise
        raise ExportError(f"{str(path)!r} is not a readable asymrnr package (corrupt or truncated?): {err}") from err


def read_manifest(path: str | Path) -> dict:
    """The package's manifest, checked against this installation (format, torch version)."""
    path = Path(path)
    with _reading(path) as archive:
        names = archive.get_file_names()
        if f"extra/{MANIFEST}" not in names:
            raise ExportError(f"{str(path)!r} has no asymrnr manifest: it was not written by asymrnr_fx.export.")
        found = json.loads(archive.read_string(f"extra/{MANIFEST}"))
    _check_compatible(found, path)
    return found


def _check_compatible(found: dict, path: Path) -> None:
    if found.get("format") != FORMAT:
        raise ExportError(f"{str(path)!r} has package format {found.get('format')}, this asymrnr_fx reads {FORMAT}.")
    built = found["versions"]["torch"]
    if built != torch.__version__:
        raise ExportError(
            f"{str(path)!r} was built with torch {built}, this is torch {torch.__version__}: AOTInductor "
            "programs are tied to the torch that compiled them. Export again with this torch."
        )
    device = torch.device(found["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"{str(path)!r} holds programs for {device}, and CUDA is not available here.")


def load_exported(path: str | Path) -> ExportedTransformer:
    """The module a package describes: call it as the original transformer (same keyword
    arguments, same shapes); it runs the package's programs, with no Dynamo or Inductor compile."""
    path = Path(path)
    found = read_manifest(path)
    with _reading(path) as archive:
        state_bytes, weight_bytes = archive.read_bytes(STATE), archive.read_bytes(WEIGHTS)
    stream = io.BytesIO(state_bytes)
    rt = AsymRnRRuntime(pickle.load(stream))
    state = _Unpickler(stream, rt).load()
    weights = {k: v.to(found["device"]) for k, v in safetensors.torch.load(weight_bytes).items()}
    programs = {name: _Program(path, name) for name in state["keys"]}
    return ExportedTransformer(found, state, rt, weights, programs, path)


def strided_as(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """`t` laid out with `stride`, the layout a program was compiled for: AOTInductor programs
    index their inputs with the example's strides (a pipeline's `t.expand(batch)` timestep, stride
    0, would be read past its one element)."""
    if t.stride() == stride or t.numel() <= 1:
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


class _Program:
    """One AOTInductor program of the package, called with flat tensors (no pytree per call)."""

    def __init__(self, path: Path, name: str) -> None:
        from torch._inductor.package import load_package

        self.name, self.loader = name, load_package(str(path), model_name=name).loader

    def __call__(self, *args: torch.Tensor) -> tuple:
        return tuple(self.loader.boxed_run(list(args)))


class ExportedTransformer(torch.nn.Module, CacheMixin):
    """A loaded package: a drop-in `transformer` for the diffusers pipeline it was exported from
    (`config`, `dtype`, `device`, `cache_context`). `.asymrnr` is its runtime (stats, reset,
    set_step), with the compiled path's semantics; it compiles nothing, and a call the package
    was not built for is an `ExportError` saying what it was built for."""

    def __init__(self, manifest: dict, state: dict, rt: AsymRnRRuntime, weights: dict[str, torch.Tensor],
                 programs: dict[str, _Program], path: Path) -> None:
        super().__init__()
        self.manifest, self.path, self.compiled = manifest, path, state["compiled"]
        self.__dict__["asymrnr"] = rt
        self._sources, self._forward, self._strides = state["sources"], state["forward"], state["strides"]
        self._weights = {s[1]: strided_as(weights[s[1]], st) for s, st in zip(self._sources, self._strides) if s[0] == "weight"}
        self._bind_runtime(rt, state, programs)
        self._config = FrozenDict(manifest["model_config"])
        self._wanted = {tuple(i["path"]): i for i in manifest["inputs"]}  # input path -> its recorded shape
        pipeline_hook.attach(self, rt)

    def _bind_runtime(self, rt: AsymRnRRuntime, state: dict, programs: dict[str, _Program]) -> None:
        rt.bind(state["info"])
        rt.active_sites, rt.symmetric_points = state["active_sites"], state["symmetric_points"]
        rt.compiled = {state["keys"][name]: program for name, program in programs.items()}
        rt.segment_compiler = self._missing_program

    @property
    def config(self) -> FrozenDict:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    @property
    def device(self) -> torch.device:
        return torch.device(self.manifest["device"])

    def _missing_program(self, key: tuple, build: Any, inputs: list) -> Any:
        shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        raise ExportError(
            f"{str(self.path)!r} has no program for segment variant {key[1]!r} with input shapes {shapes}: "
            f"the package was built for {self._built_for()} and {self.manifest['num_steps']} steps."
        )

    def _built_for(self) -> str:
        return ", ".join(f"{'/'.join(map(str, i['path']))} {tuple(i['shape'])} {i['dtype']}" for i in self.manifest["inputs"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = self._keywords(args, kwargs)
        return_dict = kwargs.pop("return_dict", True)
        self._check_constants(kwargs)
        flat = [strided_as(self._input(source, kwargs), st) for source, st in zip(self._sources, self._strides)]
        with torch.no_grad():
            out = self._run(flat)
        return Transformer2DModelOutput(sample=out[0]) if return_dict else tuple(out)

    def _keywords(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self._forward):
            raise TypeError(f"{len(args)} positional arguments given, the transformer takes {len(self._forward)}.")
        return {**dict(zip(self._forward, args)), **kwargs}

    def _check_constants(self, kwargs: dict) -> None:
        """Python values the graph was traced with are baked in, and arguments it was traced
        without are not read: either would be silently ignored."""
        for name, value in kwargs.items():
            if name not in self.manifest["arguments"] and value is not None:
                raise ExportError(f"argument {name!r} was not given at export: the package cannot read it.")
            if not _holds_tensor(value) and repr(value) != self.manifest["constants"].get(name, "None"):
                built = self.manifest["constants"].get(name, "None (not given)")
                raise ExportError(f"{name}={value!r}: the package was exported with {name}={built}.")

    def _input(self, source: tuple, kwargs: dict) -> torch.Tensor:
        if source[0] == "weight":
            return self._weights[source[1]]
        value = kwargs
        try:
            for key in source[1:]:
                value = value[key]
        except (KeyError, IndexError, TypeError) as err:
            raise ExportError(f"missing input {'/'.join(map(str, source[1:]))}: the package needs {self._built_for()}.") from err
        return self._checked(source, value)

    def _checked(self, source: tuple, value: Any) -> torch.Tensor:
        want = self._wanted[source[1:]]
        if not isinstance(value, torch.Tensor) or _describe(value) != {"shape": want["shape"], "dtype": want["dtype"]} \
                or value.device != self.device:
            got = f"{tuple(value.shape)} {value.dtype} on {value.device}" if isinstance(value, torch.Tensor) else repr(value)
            raise ExportError(
                f"input {'/'.join(map(str, source[1:]))} is {got}; the package was built for "
                f"{tuple(want['shape'])} {want['dtype']} on {self.device} (resolution, frames and batch are fixed "
                "at export: export again for other shapes)."
            )
        return value

    def _run(self, flat: list) -> Any:
        rt, compiled = self.asymrnr, self.compiled
        with rt.lock:
            compiled.place(flat)
            self._check_step(rt)
            return compiled.top(*flat)

    def _check_step(self, rt: AsymRnRRuntime) -> None:
        served = self.manifest["num_steps"]
        if rt.step >= served or (rt.num_steps or 0) > served:
            raise ExportError(
                f"step {rt.step} of a {rt.num_steps or '?'}-step generation: the package serves {served} steps. "
                f"Export with num_steps >= the pipeline's num_inference_steps."
            )
