"""Small adapters over a LiteRT interpreter for the benchmark: float runs, the execution plan, MAC counts.

The agent's int8 path goes through ``edge_agent.loader`` (the one place the site imports the
runtime); the benchmark also needs the float model and the delegate's view of the graph,
which the agent never does, so it opens interpreters here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.loader import native_stderr_to_log


def open_interpreter(model_path: Path, threads: int, xnnpack: bool = True) -> Any:
    """A LiteRT interpreter with XNNPACK (LiteRT's default CPU delegate) or the builtin kernels only."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with native_stderr_to_log("ai_edge_litert"):
        interpreter = Interpreter(model_path=str(model_path), num_threads=threads,
                                  experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
    return interpreter


class FloatRunner:
    """Runs a float32 digit model on (N, 28, 28) uint8 digits: pixels / 255 in, argmax of the output out."""

    def __init__(self, model_path: Path, threads: int, xnnpack: bool = True):
        self.interpreter = open_interpreter(model_path, threads, xnnpack)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._batch = int(self.interpreter.get_input_details()[0]["shape"][0])

    def outputs(self, digits: np.ndarray) -> np.ndarray:
        n = len(digits)
        if n != self._batch:
            self.interpreter.resize_tensor_input(self._input, [n, 28, 28, 1])
            self.interpreter.allocate_tensors()
            self._batch = n
        self.interpreter.set_tensor(self._input, (digits.astype(np.float32) / np.float32(255.0)).reshape(n, 28, 28, 1))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output)

    def labels(self, digits: np.ndarray) -> np.ndarray:
        return self.outputs(digits).argmax(axis=1)


class Int8Runner:
    """The int8 model's raw invoke on uint8 digits, with or without XNNPACK (no softmax, no checks)."""

    def __init__(self, model_path: Path, threads: int, xnnpack: bool = True):
        self.interpreter = open_interpreter(model_path, threads, xnnpack)
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._batch = int(self.interpreter.get_input_details()[0]["shape"][0])

    def labels(self, digits: np.ndarray) -> np.ndarray:
        n = len(digits)
        if n != self._batch:
            self.interpreter.resize_tensor_input(self._input, [n, 28, 28, 1])
            self.interpreter.allocate_tensors()
            self._batch = n
        self.interpreter.set_tensor(self._input, digits.reshape(n, 28, 28, 1))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output).argmax(axis=1)


def execution_plan(interpreter: Any) -> list[dict]:
    """Every op of the model and what runs it: "XNNPACK" (inside a delegate node) or "builtin".

    After the delegate is applied the interpreter lists the model's own nodes and then one
    DELEGATE node per delegated partition; an op is delegated when it lies on a path from a
    delegate node's outputs back to that node's inputs.
    """
    raw = interpreter._interpreter  # noqa: SLF001 - the node list has no public accessor
    nodes = [(i, raw.NodeName(i), [int(t) for t in raw.NodeInputs(i) if t >= 0],
              [int(t) for t in raw.NodeOutputs(i) if t >= 0]) for i in range(raw.NumNodes())]
    delegates = [n for n in nodes if n[1] == "DELEGATE"]
    ops = [n for n in nodes if n[1] != "DELEGATE"]
    producer = {t: n for n in ops for t in n[3]}
    delegated: set[int] = set()
    for _i, _name, inputs, outputs in delegates:
        stack, seen = list(outputs), set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in inputs or tensor not in producer:
                continue
            seen.add(tensor)
            node = producer[tensor]
            delegated.add(node[0])
            stack.extend(node[2])
    return [{"op": name, "runs_on": "XNNPACK" if index in delegated else "builtin"}
            for index, name, _inputs, _outputs in ops]


def count_macs(model_path: Path) -> dict:
    """Multiply-accumulates per digit of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op (batch 1)."""
    interpreter = open_interpreter(model_path, 1, xnnpack=False)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [1, 28, 28, 1])
    interpreter.allocate_tensors()
    shapes = {t["index"]: [int(x) for x in t["shape"]] for t in interpreter.get_tensor_details()}
    per_op = []
    for op in interpreter._get_ops_details():  # noqa: SLF001 - op list with tensor ids
        name = op["op_name"]
        inputs = [int(t) for t in op["inputs"] if t >= 0]
        out = shapes[int(op["outputs"][0])]
        if name == "CONV_2D":
            cout, kh, kw, cin = shapes[inputs[1]]
            macs = out[1] * out[2] * cout * kh * kw * cin
            shape = f"{kh}x{kw}x{cin}->{cout} on {out[1]}x{out[2]}"
        elif name == "DEPTHWISE_CONV_2D":
            _one, kh, kw, cout = shapes[inputs[1]]
            macs = out[1] * out[2] * cout * kh * kw
            shape = f"dw {kh}x{kw}x{cout} on {out[1]}x{out[2]}"
        elif name == "FULLY_CONNECTED":
            units, features = shapes[inputs[1]]
            macs = units * features
            shape = f"{features}->{units}"
        else:
            continue
        per_op.append({"op": name, "shape": shape, "macs": int(macs)})
    return {"per_op": per_op, "total": int(sum(o["macs"] for o in per_op))}
