"""ONNX export for deployment runtimes (onnxruntime, TensorRT, OpenVINO, ...): one graph from
`pixel_values` float32 [batch, C, H, W] (normalised images) to `logits` [batch, classes], with a
dynamic batch axis.

torch's TorchScript-based exporter (`dynamo=False`) is used: it needs nothing beyond torch (the
torch.export-based one needs the onnxscript package), and a ViT's eval graph traces whole. A
trace records the sizes of data-dependent work as constants, so only models whose forward has
none export (`onnx_export_problem`): dense models, and randomly routed MoE layers in eval mode
`merged` (the experts' average) or `ensemble` (every expert on every token). A routed MoE layer
(switch, top-k, expert choice; random routing in eval mode `random`) sorts its tokens by expert
and sizes each expert's rows from the data; the exporter cannot express that sort, and a graph
with the example batch's row counts frozen in would be wrong on any other batch. Such models
are merged first (`vitmoe.merge_experts`, `vitmoe export --merge`). Soft MoE layers use a
grouped matrix multiply that ONNX has no operator for.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..fileio import atomic_write
from ..moe import router_class
from .config import ViTConfig
from .io import ModelFileError
from .vit import VisionTransformer

INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
"""The graph's input and output names (transformers' names for the same tensors)."""
OPSET = 17
"""ONNX opset: the first with LayerNormalization as one operator; onnxruntime 1.14+ runs it."""
EXPORTABLE_EVAL_MODES = ("merged", "ensemble")


def onnx_export_problem(cfg: ViTConfig) -> str | None:
    """Why the model cannot be exported to ONNX as it is (naming the setting), or None."""
    if not cfg.is_moe:
        return None
    router = router_class(cfg.moe.router)
    if router.random_routes and cfg.moe.eval_mode in EXPORTABLE_EVAL_MODES:
        return None
    if not router.routes_tokens:
        return (f"model field moe.router={cfg.moe.router!r}: Soft MoE layers mix tokens into slots with a grouped "
                "matrix multiply that ONNX has no operator for, and cannot be merged; train a dense or routed model "
                "to export")
    if router.random_routes:
        return (f"model field moe.eval_mode={cfg.moe.eval_mode!r} draws a route at every forward, which an ONNX graph "
                f"cannot; export in eval mode {' or '.join(EXPORTABLE_EVAL_MODES)}, or pass --merge")
    return (f"model field moe.router={cfg.moe.router!r}: its MoE layers dispatch tokens to experts chosen from the data "
            "(a sort and per-expert row counts), which the ONNX exporter cannot express; pass --merge to export the "
            "experts' average as a dense ViT (vitmoe.merge_experts), or export a dense model")


INSTALL_HINT = "pip install 'vitmoe[onnx]' (the onnx package; onnxruntime to run the graph)"


def require_onnx() -> None:
    """ImportError saying what to install when the `onnx` package, which torch's exporter writes
    the graph with, is missing."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"ONNX export needs the onnx package: {INSTALL_HINT}")


def export_onnx(model: VisionTransformer, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write the model's eval graph to `path` (see the module docstring); ModelFileError naming the
    model field when it cannot be expressed, ImportError when the onnx package is missing."""
    require_onnx()
    problem = onnx_export_problem(model.config)
    if problem:
        raise ModelFileError(f"cannot export to ONNX: {problem}")
    cfg = model.config
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(2, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            # The tracer's notes on Python conditions over shapes (constant per model: image side, widths)
            # and the exporter's notice that the torch.export-based exporter exists (see the docstring).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (example,), tmp, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=axes, opset_version=opset)

    try:
        with torch.no_grad():
            return atomic_write(path, write)
    except (torch.onnx.errors.OnnxExporterError, torch.onnx.errors.UnsupportedOperatorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"cannot export to ONNX: the exporter failed: {first}") from None
    finally:
        model.train(was_training)
