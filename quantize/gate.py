"""Pure decisions of the quantisation step: the accuracy gate and the acceptance threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class GateError(Exception):
    """The int8 model is not fit to ship."""


@dataclass(frozen=True)
class GateResult:
    float_accuracy: float
    int8_accuracy: float
    max_drop_pp: float

    @property
    def drop_pp(self) -> float:
        return (self.float_accuracy - self.int8_accuracy) * 100.0


def check_gate(float_accuracy: float, int8_accuracy: float, non_integer_ops: list[str],
               max_drop_pp: float) -> GateResult:
    """Refuse a model that left any op in float or lost more than max_drop_pp points."""
    result = GateResult(float_accuracy, int8_accuracy, max_drop_pp)
    if non_integer_ops:
        raise GateError(f"not full-integer: {'; '.join(non_integer_ops[:5])}")
    if result.drop_pp > max_drop_pp:
        raise GateError(
            f"int8 accuracy {int8_accuracy:.4f} is {result.drop_pp:.2f} pp below float "
            f"{float_accuracy:.4f} (limit {max_drop_pp} pp)"
        )
    return result


def wilson_upper(errors: np.ndarray, n: np.ndarray, z: float = 1.645) -> np.ndarray:
    """One-sided upper confidence bound on an error rate (Wilson score interval, 95% at z=1.645)."""
    n = np.asarray(n, dtype=np.float64)
    p = np.asarray(errors, dtype=np.float64) / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


def choose_threshold(confidences: np.ndarray, correct: np.ndarray, target_precision: float) -> dict:
    """Lowest confidence threshold at which validation shows the target precision with 95% confidence.

    The error rate among accepted digits is taken at its one-sided 95% Wilson upper
    bound, not its point estimate: a threshold is only trusted when enough validation
    digits back it, so it carries over to traffic it has not seen. With too little
    evidence the threshold rises to the highest confidence seen.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    order = np.argsort(-confidences, kind="stable")
    conf_sorted, wrong_sorted = confidences[order], ~correct[order]
    accepted = np.arange(1, len(conf_sorted) + 1)
    errors = np.cumsum(wrong_sorted)
    # Only cut between distinct confidence values: equal scores are accepted together.
    last_of_value = np.r_[conf_sorted[1:] != conf_sorted[:-1], True]
    ok = last_of_value & (wilson_upper(errors, accepted) <= 1.0 - target_precision)
    if not ok.any():
        threshold = float(conf_sorted[0]) if len(conf_sorted) else 1.0
    else:
        cut = int(np.flatnonzero(ok)[-1])
        threshold = float(conf_sorted[cut])
    n_accepted = int(np.sum(confidences >= threshold))
    n_wrong = int(np.sum((confidences >= threshold) & ~correct))
    return {
        "threshold": threshold,
        "target_precision": target_precision,
        "validation_digits": int(len(confidences)),
        "validation_coverage": round(n_accepted / max(len(confidences), 1), 5),
        "validation_precision": round(1 - n_wrong / max(n_accepted, 1), 6),
        "validation_errors_accepted": n_wrong,
        "rule": "lowest threshold whose 95% Wilson upper bound on the error rate is within target",
    }


def histogram(values: np.ndarray, bins: int = 20, upper: float = 1.0) -> dict:
    """A fixed-edge histogram on [0, upper], stored as a drift baseline."""
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(0.0, upper))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()}
