"""Run-time shape checks for head groups: a computed mask on the attention scores must have size 1
on the head axis, or cutting heads would break the broadcast.  One ONNX Runtime run of the model on
the first calibration sample (or a seeded synthetic one) reads the masks' shapes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx

from .calibration import CalibrationError, CalibrationSet, SyntheticSpec, effective_batch, model_inputs, synthetic
from .runtime import _first_line
from .structured import UnitGroup


def _first_sample(proto: onnx.ModelProto, calibration: CalibrationSet | None) -> dict[str, np.ndarray]:
    if calibration is None:
        # integers 0: a valid index for any table (token ids, token types), and shapes do not depend on values
        calibration = synthetic(model_inputs(proto), SyntheticSpec(samples=1, dynamic_dim=8, int_range=(0, 1)))
    for batch in calibration.batches(effective_batch(1, model_inputs(proto))):  # a batch the model fixes
        return dict(batch.feeds)
    raise CalibrationError("the calibration data holds no sample")


def mask_shapes(proto: onnx.ModelProto, names: Sequence[str],
                calibration: CalibrationSet | None) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors ``names`` on one sample; raises ``RuntimeError`` with the reason."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        feeds = _first_sample(proto, calibration)
        sess = ort.InferenceSession(probe.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        outs = sess.run(list(names), feeds, ro)
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own types; the reason is reported)
        raise RuntimeError(f"a run to read the mask shapes failed: {_first_line(e)}") from e
    return {n: tuple(np.shape(o)) for n, o in zip(names, outs)}


def failed_checks(proto: onnx.ModelProto, groups: Sequence[UnitGroup],
                  calibration: CalibrationSet | None) -> dict[int, str]:
    """``{index of group: why it cannot be cut}`` for the head groups whose masks differ per head."""
    names = list(dict.fromkeys(c[0] for g in groups for c in g.head_axis_checks))
    if not names:
        return {}
    try:
        shapes = mask_shapes(proto, names, calibration)
    except (RuntimeError, CalibrationError) as e:
        return {i: f"{e}" for i, g in enumerate(groups) if g.head_axis_checks}
    out: dict[int, str] = {}
    for i, g in enumerate(groups):
        for name, axis, want, what in g.head_axis_checks:
            shape = shapes[name]
            size = shape[len(shape) + axis] if len(shape) + axis >= 0 else 1
            if size == want:
                continue
            if what == "mask":
                out[i] = (f"the mask '{name}' added to its scores has shape {list(shape)}: {size} entries on the "
                          "head axis, so it differs per head")
            else:
                out[i] = (f"'{name}' has shape {list(shape)}: {size} on the head axis, not the {want} heads the "
                          "target's -1 stands for")
            break
    return out


__all__ = ["failed_checks", "mask_shapes"]
