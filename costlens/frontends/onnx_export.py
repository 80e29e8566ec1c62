"""``costlens export``: a PyTorch source -> an ONNX file, graph only.

The module is built on the meta device (as for analysis; a module with real weights is
exported where it is, its weights still not written) and exported with torch.onnx's
dynamo exporter, dynamic in ``batch`` and ``seq``, with transformers experts in dense
dispatch and Python-written activations as one op (``canonical.canonical_forms``). Meta
tensors hold no values, so the exporter's optimizer (which folds constants by reading
them) is off, and every parameter is written as an external-data initializer: name, dtype,
shape and an offset into ``<file>.data`` — a file that is never written. The result loads in
any tool that reads graphs without weights (costlens itself, Netron, onnx.load with
``load_external_data=False``).
"""
from __future__ import annotations

import os
from pathlib import Path

from costlens.errors import CostlensError
from costlens.frontends.torch_export import TraceError

ALIGNMENT = 4096          # external-data offsets aligned as onnx's own writer does for large tensors


class ExportError(CostlensError):
    """The source could not be exported to ONNX."""


def resolve_module(source):
    """(module on the meta device, example inputs or None) of a PyTorch source: an
    ``nn.Module``, a transformers config (object, ``config.json``, folder or hub id) or an
    import spec; classified by frontends/source.py, as ``load_graph`` does."""
    from costlens.frontends import hf_config
    from costlens.frontends.source import SourceKind, classify, torch_source
    found = classify(source)
    if found.kind is SourceKind.ONNX:
        raise ExportError(f"{source}: already an ONNX file")
    model, example_inputs = torch_source(found)
    if hasattr(model, "model_type") and not hasattr(model, "forward"):
        return hf_config.build_model(model, found.text), None
    return model, example_inputs


def export_onnx(source, output: str | os.PathLike) -> Path:
    """Write the ONNX graph of ``source`` to ``output`` (weights as never-written external data)."""
    import onnx
    import torch

    from costlens.frontends.torch_export import (
        traced_canonical, dynamic_shapes, quiet, device_of, evaluating, example_args,
    )
    output = Path(output)
    # checked before the trace, which can take minutes on a big model (issue 16 item 10)
    if not output.parent.is_dir():
        raise ExportError(f"{output}: the folder {output.parent} does not exist")
    if output.is_dir():
        raise ExportError(f"{output}: is a folder (give the .onnx file to write)")
    module, example_inputs = resolve_module(source)
    args, kwargs = example_args(example_inputs, device_of(module))
    dynamic, _ = dynamic_shapes(args, kwargs)
    names = [f"input_{i}" if i else "input_ids" for i in range(len(args))]
    with quiet(), traced_canonical(module), evaluating(module):
        try:
            program = torch.onnx.export(
                module, args, kwargs=kwargs or None, dynamo=True, optimize=False, verbose=False,
                input_names=names, dynamic_shapes=tuple({d: ("batch", "seq")[d] for d in spec} if spec else None
                                                        for spec in dynamic))
        except Exception as e:  # noqa: BLE001 - reported in one line
            raise ExportError(f"{source}: torch.onnx could not export the model ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e
    shapes = _optimize_without_weights(program.model, source)
    # written under a temporary name in the same folder and renamed: never a half-written file
    partial = output.with_name(f".{output.name}.partial")
    try:
        program.save(partial)
        model = onnx.load_model(str(partial), load_external_data=False)
        _add_external_initializers(model, shapes, f"{output.name}.data")
        onnx.save_model(model, str(partial))
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


def _optimize_without_weights(model, source) -> dict:
    """torch.onnx's optimizer (inlining, constant folding, CSE, ...) with the parameters
    hidden from it as graph inputs — folding reads constants, and meta tensors have no values.
    Returns the parameters' (shape, dtype), removed from the graph."""
    from onnxscript.optimizer import optimize_ir
    graph = model.graph
    params = dict(graph.initializers)
    shapes = {name: (tuple(v.shape), v.dtype) for name, v in params.items()}
    for name, value in params.items():
        graph.initializers.pop(name)
        value.const_value = None
        graph.inputs.append(value)
    with _quiet_optimizer():
        try:
            optimize_ir(model)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"{source}: optimizing the exported graph failed ({type(e).__name__}: {e})") from e
    for value in [v for v in graph.inputs if v.name in params]:
        graph.inputs.remove(value)
    return shapes


def _quiet_optimizer():
    from costlens.frontends.torch_export import quiet
    return quiet()


def _add_external_initializers(model, shapes: dict, location: str) -> None:
    """Each parameter as an initializer whose bytes live at an offset of ``location``."""
    from onnx import TensorProto
    offset = 0
    for name, (shape, dtype) in shapes.items():
        tensor = TensorProto(name=name, dims=[int(d) for d in shape], data_type=int(dtype))
        tensor.data_location = TensorProto.EXTERNAL
        length = _numel(shape) * dtype.itemsize
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        model.graph.initializer.append(tensor)
        offset += -(-length // ALIGNMENT) * ALIGNMENT


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count


__all__ = ["ExportError", "TraceError", "export_onnx", "resolve_module"]
