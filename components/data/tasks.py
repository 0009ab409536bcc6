"""Local task generators: tasks the project defines itself, next to reasoning-gym's.

A local task behaves like a reasoning-gym dataset (``ds[i]`` gives ``{question, answer, metadata}``,
``ds.score_answer(output, entry)`` is its verifier), so it is chosen in YAML exactly like a
reasoning-gym generator, by name in ``data.tasks``::

    data:
      tasks:
        - name: column_sum
          config: {digits: 2, format: worked}
          weight: 3
          tag: d2

Names in :data:`LOCAL_TASKS` take precedence over reasoning-gym's.

``column_sum`` is the ``reasoning`` regime's task: a two-term sum or difference (like reasoning-gym's
``chain_sum`` with two terms) whose ``worked`` answer writes the column-wise arithmetic out, from the
units column up, before a final answer after a fixed marker::

    47 + 38 = 7+8+0=15, 4+3+1=8, #### 85
    15 - 43 = -(43-15): 3-5-0=-2, 4-1-1=2, #### -28

Each column reads ``x op y op carry = s``: for a sum the column's digit is ``s mod 10`` and the carry
``s // 10``; for a difference a negative ``s`` means "digit s+10, borrow 1". A difference with a
negative result swaps the terms and says so (``-(b-a):``). The verifier reads only the text after the
last marker (no marker: no credit), so a correct answer with wrong steps still passes; the worked
text is kept as the prompt's ``reference`` (``metadata["answer_cot"]``, which the DataModule reads
into ``Prompt.reference``), and the marker is carried on ``Prompt.answer_marker`` so a reward can
split a completion into reasoning and answer (:func:`split_completion`, :func:`reference_answer`).

``format: plain`` gives the bare answer instead (the dense mix's format), scored by exact match.

Every character used is in the embedded char tokenizer (printable ASCII).
"""

from __future__ import annotations

import random
from typing import Any

ANSWER_MARKER = "####"


def split_completion(text: str, marker: str) -> tuple[str, str | None]:
    """Split a completion at the *last* ``marker`` into (reasoning, final answer).

    The reasoning part ends with the marker (it is the context after which DRO teacher-forces the
    reference answer); the answer is stripped. Without a marker the whole text is reasoning and
    the answer is None (the verifier gives no credit).
    """
    k = text.rfind(marker)
    if k < 0:
        return text, None
    return text[: k + len(marker)], text[k + len(marker) :].strip()


def reference_answer(reference: str, marker: str) -> str:
    """The reference solution's final-answer text after its marker, with its leading space, i.e.
    the tokens ``y`` that a reference-based reward (DRO's R3) teacher-forces after a rollout's
    reasoning. Raises ValueError when the reference has no marker."""
    k = reference.rfind(marker)
    if k < 0:
        raise ValueError(f"reference solution {reference!r} has no answer marker {marker!r}")
    return reference[k + len(marker) :]


def worked_steps(a: int, op: str, b: int) -> tuple[str, int]:
    """Column-wise worked text (without the final marker and answer) and the value of ``a op b``."""
    if op not in ("+", "-"):
        raise ValueError(f"op must be '+' or '-', got {op!r}")
    value = a + b if op == "+" else a - b
    head = ""
    x, y = a, b
    if op == "-" and a < b:
        head, x, y = f"-({b}-{a}): ", b, a
    xs, ys = str(x)[::-1], str(y)[::-1]
    cols, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        dx = int(xs[i]) if i < len(xs) else 0
        dy = int(ys[i]) if i < len(ys) else 0
        if op == "+":
            s = dx + dy + carry
            cols.append(f"{dx}+{dy}+{carry}={s}")
            carry = s // 10
        else:
            s = dx - dy - carry
            cols.append(f"{dx}-{dy}-{carry}={s}")
            carry = 1 if s < 0 else 0
    return head + ", ".join(cols) + ",", value


class ColumnSumDataset:
    """Two-term sums/differences of ``digits``-digit numbers, answered plain or with worked steps.

    Args:
        seed, size: as reasoning-gym's ``create_dataset`` (items are a pure function of the seed).
        digits: digits per term (1-digit terms are 0..9, d-digit terms 10^(d-1)..10^d-1).
        ops: the operators to draw from ("+-" as chain_sum, or "+" for sums only).
        format: ``worked`` (steps, then ``answer_marker`` and the answer) or ``plain``.
    """

    def __init__(self, seed: int, size: int, digits: int = 2, ops: str = "+-", format: str = "worked") -> None:
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        if not ops or set(ops) - {"+", "-"}:
            raise ValueError(f"ops must be a non-empty string of '+' and '-', got {ops!r}")
        if format not in ("worked", "plain"):
            raise ValueError(f"format must be 'worked' or 'plain', got {format!r}")
        self.digits, self.ops, self.format = digits, ops, format
        self.answer_marker = ANSWER_MARKER if format == "worked" else None
        rng = random.Random(f"column_sum:{seed}:{digits}:{ops}")
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        self.items = [
            self._item(rng.randint(lo, 10**digits - 1), rng.choice(ops), rng.randint(lo, 10**digits - 1), i) for i in range(size)
        ]

    def _item(self, a: int, op: str, b: int, index: int) -> dict[str, Any]:
        steps, value = worked_steps(a, op, b)
        expr = f"{a} {op} {b}"
        meta = {"source_dataset": "column_sum", "source_index": index, "expression": expr, "digits": self.digits}
        if self.format == "worked":
            meta["answer_cot"] = f" {steps} {ANSWER_MARKER} {value}"
        return {"question": f"{expr} =", "answer": str(value), "metadata": meta}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        """1.0 when the final answer equals the gold one exactly, else 0.0 (binary: no partial credit).

        In the worked format only the text after the last marker counts.
        """
        if answer is None:
            return 0.0
        if self.answer_marker is not None:
            answer = split_completion(answer, self.answer_marker)[1]
            if answer is None:
                return 0.0
        return float(answer.strip() == str(entry["answer"]))


LOCAL_TASKS: dict[str, type] = {"column_sum": ColumnSumDataset}


def create_local_dataset(name: str, seed: int, size: int, **config: Any) -> ColumnSumDataset:
    """Build a local task by name (same call shape as ``reasoning_gym.create_dataset``)."""
    return LOCAL_TASKS[name](seed=seed, size=size, **config)


def target_text(prompt: Any) -> str:
    """The supervised target of a prompt for warm starts: its worked reference when the task answers
    in worked steps (``answer_marker`` set), else a space and the bare answer."""
    if getattr(prompt, "answer_marker", None) and prompt.reference:
        return prompt.reference
    return " " + prompt.answer
