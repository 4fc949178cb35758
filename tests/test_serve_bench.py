"""benchmarks/serve.py's table: every row against the PyTorch row of the same kind, int8 against float per kind."""

from __future__ import annotations

from benchmarks.serve import MODEL_ONLY, MODEL_ONLY_BATCH, serve_lines


def _row(p50_ms: float) -> dict[str, float]:
    return {"requests": 10, "requests_per_s": 1000.0 / p50_ms, "p50_ms": p50_ms, "p95_ms": 2 * p50_ms}


def test_each_row_is_compared_with_the_pytorch_row_of_its_kind_and_int8_with_float():
    rows = {"pytorch": _row(8.0), "onnx-float": _row(4.0), "onnx-int8": _row(4.0), f"pytorch{MODEL_ONLY}": _row(2.0),
            f"onnx-float{MODEL_ONLY}": _row(0.5), f"onnx-int8{MODEL_ONLY}": _row(0.4),
            f"pytorch{MODEL_ONLY_BATCH}": _row(20.0), f"onnx-float{MODEL_ONLY_BATCH}": _row(6.0),
            f"onnx-int8{MODEL_ONLY_BATCH}": _row(3.0), "http-float": _row(16.0)}
    lines = serve_lines({"settings": {"requests": 10}, "rows": rows})
    table = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert "| 0.30× |" in table[f"onnx-float{MODEL_ONLY_BATCH}"]  # p50 6 ms against PyTorch's batch 20 ms
    assert "| 0.25× |" in table[f"onnx-float{MODEL_ONLY}"] and "| 2.00× |" in table["http-float"]
    speed_line = next(line for line in lines if line.startswith("int8"))
    assert "model only 1.25×" in speed_line and "batch 32 2.00×" in speed_line
    assert "whole request in process 1.00×" in speed_line
