"""Hint sources for SAGE self-hinting (:mod:`components.samplers.sage`): for a prompt, hints of
increasing strength ``{1: h1, 2: h2, ..., L: hL}`` written from privileged information (the
prompt's reference solution, or its answer) that the policy never sees at test time.

* :class:`SelfHint` is the paper's *online self-hint*: the current policy itself writes the hints,
  as JSON with keys ``level_1 .. level_L``, from the bare question and the solution, prompted with
  the authors' system prompt (``recipe/hint/prompt.py``). One call gives every level; up to
  ``attempts`` tries when nothing parses. It needs a model that can follow the instruction.
* :class:`PrefixHint` is a deterministic offline source for models that cannot write hints (the
  embedded char model): level ``l`` of ``L`` reveals the first ``floor(l / (L + 1) * n)`` characters
  of the solution, never all of it (a partial-solution hint, as in Scaf-GRPO). Not the paper's
  source; use it to exercise the SAGE loop on CPU or as an ablation.

A prompt with no privileged text gets no hint (the SAGE pitfall "no reference, no hint"); with
``use_answer=True`` the verifier's answer stands in for a missing reference solution.

A source counts what it did in ``stats`` (``hint/generate_attempts``, ``hint/generate_leaked``,
``hint/parse_fallback_text``, ``hint/skipped_overflow``); the hinting transform adds these up over
a step (a step may ask for hints several times: DAPO refills, Ada-Seq) and logs them once.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

from components.errors import ConfigError
from components.types import Prompt

# The authors' hint-writing prompt, verbatim (BaohaoLiao/SAGE recipe/hint/prompt.py). It asks for
# 3 levels; with max_level > 3 the higher levels are simply missing (and never applied).
HINT_SYSTEM = """You are a tutoring assistant that generates progressive hints to help students solve difficult problems without revealing the solution directly.

TASK:
Given a question and its solution, generate 3 levels of hints that progressively guide the student toward solving the problem independently.

HINT LEVELS:
- Level 1: Minimal hint - Points to the key concept or approach without specifics
- Level 2: Medium hint - Provides more direction on the method or intermediate steps
- Level 3: Detailed hint - Gives substantial guidance while still requiring the student to complete the solution

GUIDELINES:
- Never reveal the final answer
- Hints should inspire problem-solving, not just provide steps to copy
- Tailor hint difficulty to bridge the gap between the student's level and the solution

OUTPUT FORMAT:
```json
{
    "level_1": "minimal hint text",
    "level_2": "medium hint text",
    "level_3": "detailed hint text"
}
```"""
HINT_USER = "Question: \n{problem}\n\nSolution:\n{solution}\n"  # the authors' template, verbatim


def bare_question(prompt: Prompt) -> str:
    """The question without the task's prompt template when known (``Prompt.question``), else the prompt text."""
    return prompt.question if prompt.question else prompt.text


class HintSource(ABC):
    """Writes hints of levels ``1..levels`` for prompts; ``None`` where it has none for a prompt."""

    def __init__(self, use_answer: bool = False) -> None:
        self.use_answer = use_answer
        self.stats: Counter[str] = Counter()
        self.context_limit: int | None = None  # tokens the hint-writing call may use; set by setup

    def setup(self, context_limit: int | None) -> None:
        """The model's context length (prompt + reply), so a request that cannot fit is skipped."""
        self.context_limit = context_limit

    def solution(self, prompt: Prompt) -> str | None:
        """The privileged text hints are written from: the reference solution, else (opt-in) the answer."""
        if prompt.reference:
            return prompt.reference
        return prompt.answer if self.use_answer and prompt.answer else None

    @abstractmethod
    def hints(self, prompts: list[Prompt], levels: int, handle: Any) -> list[dict[int, str] | None]:
        """One ``{level: hint}`` per prompt (``None``: no hint for it). ``handle`` is the sampling context."""


class PrefixHint(HintSource):
    """Level ``l`` of ``levels`` = the first ``floor(l / (levels + 1) * n)`` characters of the
    solution (at least one, never all); the hint is stripped of surrounding whitespace."""

    def hints(self, prompts: list[Prompt], levels: int, handle: Any) -> list[dict[int, str] | None]:
        out: list[dict[int, str] | None] = []
        for p in prompts:
            sol = self.solution(p)
            if not sol or len(sol) < 2:  # a one-character solution has no proper prefix
                out.append(None)
                continue
            n = len(sol)
            out.append({lv: sol[: min(max(1, lv * n // (levels + 1)), n - 1)].strip() for lv in range(1, levels + 1)})
        return out


# ---- parsing a written hint -----------------------------------------------------------------------
# LaTeX commands whose first letter makes a valid JSON escape (\b \f \n \r \t \u): a model writing
# "\frac" inside a JSON string means the command, not a form feed followed by "rac".
_LATEX_COLLIDING = (
    "frac|dfrac|tfrac|boxed|beta|binom|bar|bigl|bigr|big|bmod|bullet|backslash|"
    "neq|ne|nabla|not|nu|newline|ni|notin|right|rho|rightarrow|rfloor|rceil|rangle|"
    "times|text|textbf|textit|theta|tan|tau|to|top|triangle|tilde|underline|underbrace|uparrow|cup|cap"
)
_LATEX_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\(?=(?:" + _LATEX_COLLIDING + r")(?![A-Za-z]))")
_BAD_ESCAPE_RE = re.compile(r'(?<!\\)((?:\\\\)*)\\(?=[^"\\/bfnrtu])')  # e.g. \sqrt, \pi, \( : not JSON escapes
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_MARK_RE = re.compile(r"(?<![A-Za-z])(?:level|hint)[\s_\-]*(\d+)[\s\"'*)\]]*[:：=\-]", re.IGNORECASE)


def _repair(text: str) -> str:
    """Escape LaTeX backslashes so the text is valid JSON, and drop trailing commas."""
    text = _LATEX_RE.sub(lambda m: m.group(1) + "\\\\", text)
    text = _BAD_ESCAPE_RE.sub(lambda m: m.group(1) + "\\\\", text)
    return _TRAILING_COMMA_RE.sub(r"\1", text)


def _levels_of(obj: Any, levels: int) -> dict[int, str]:
    if not isinstance(obj, dict):
        return {}
    keys = {str(k).lower().replace(" ", "_").replace("-", "_"): v for k, v in obj.items()}
    out = {}
    for lv in range(1, levels + 1):
        h = keys.get(f"level_{lv}", keys.get(f"hint_{lv}"))
        if isinstance(h, str) and h.strip():
            out[lv] = h.strip()
    return out


def _json_objects(text: str) -> list[Any]:
    """Every JSON object that starts at a ``{`` of ``text`` and parses (text after it is ignored)."""
    dec = json.JSONDecoder()
    out = []
    for candidate in (text, _repair(text)):
        for m in re.finditer(r"\{", candidate):
            try:
                obj, _ = dec.raw_decode(candidate, m.start())
            except json.JSONDecodeError:
                continue
            out.append(obj)
        if out:
            break
    return out


def parse_hint_reply(text: str, levels: int) -> tuple[dict[int, str] | None, str]:
    """The hints of levels ``1..levels`` found in a written reply, and how they were found.

    In order: JSON inside a code fence, then the first JSON object anywhere (parsed with
    ``raw_decode``, so text after it is ignored), each tried as written and then with LaTeX
    backslashes escaped (``\\frac``, ``\\sqrt``); then a plain-text fallback reading lines such as
    ``Level 1: ...``, ``Hint 2 - ...`` or a broken JSON line ``"level_3": "..."`` (each hint runs
    to the next marker or a blank line). A reply is a success when at least level 1 is found;
    levels it lacks are never applied. Returns ``(None, "none")`` when nothing parses.
    """
    sources = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    for src in sources:
        for obj in _json_objects(src):
            found = _levels_of(obj, levels)
            if 1 in found:
                return found, "json"
    found: dict[int, str] = {}
    marks = list(_MARK_RE.finditer(text))
    for m, nxt in zip(marks, [*marks[1:], None]):
        lv = int(m.group(1))
        seg = text[m.end() : nxt.start() if nxt else len(text)].split("\n\n")[0]
        hint = seg.strip(" \t\n\"',{}*")
        if 1 <= lv <= levels and lv not in found and hint:
            found[lv] = hint
    return (found, "text") if 1 in found else (None, "none")


def parse_hint_json(text: str, levels: int) -> dict[int, str] | None:
    """The hints found by :func:`parse_hint_reply` (None when nothing parses)."""
    return parse_hint_reply(text, levels)[0]


# ---- the leak filter ------------------------------------------------------------------------------
_NUM_RE = re.compile(r"(?<![\w.+\-*/^])-?\d+(?:\.\d+)?(?![\w+\-*/^]|\.\d)")


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").strip())
    except ValueError:
        return None


def _tight(s: str) -> str:
    """Whitespace around operators and brackets removed ("x^2 + 1" -> "x^2+1"); other spaces kept."""
    return re.sub(r"\s*([^\w\s])\s*", r"\1", s.strip())


def leaks_answer(answer: str, hint: str) -> bool:
    """True when ``hint`` states ``answer`` as a standalone value.

    A numeric answer leaks when a standalone number in the hint equals it numerically ("579",
    "579.0", "= -3"); digits inside a longer number ("10" for answer 1), an identifier ("x_1") or
    an operand of an arithmetic expression ("3+1", "2^1") do not count. Any other answer leaks
    when it occurs (spaces around operators ignored) not inside a longer word or number; so a
    one-letter answer ("A") is found in any hint using that letter as a word (a known false alarm).
    """
    ans = answer.strip()
    if not ans:
        return False
    value = _as_number(ans)
    if value is not None:
        return any(_as_number(m.group(0)) == value for m in _NUM_RE.finditer(hint))
    a, h = _tight(ans), _tight(hint)
    return re.search(r"(?<![\w.])" + re.escape(a) + r"(?![\w]|\.\d)", h) is not None


class SelfHint(HintSource):
    """The current policy writes the hints (SAGE's online self-hint).

    Args:
        attempts: tries per prompt when nothing parses (authors: 3).
        max_new_tokens: length of a hint reply.
        temperature: temperature of the first attempt; 0 (default) is greedy. Retries sample at
            ``retry_temperature`` (a greedy retry would repeat the reply that failed).
        retry_temperature: temperature of attempts 2..``attempts``.
        use_answer: write from the answer when a prompt has no reference solution.
        drop_leaks: discard a prompt's hints when one of them states the answer as a standalone
            value (:func:`leaks_answer`; the paper's prompt forbids it but nothing checks; a leaked
            answer closes the gate again). A leak is not retried.
        system_prompt: the hint writer's system prompt (default: the authors' ``HINT_SYSTEM``).

    A request whose conversation plus ``max_new_tokens`` cannot fit the model's context is skipped
    (no hint; counted in ``hint/skipped_overflow``). Its length is measured with the sampling
    context's ``encode`` of the system and user text, plus a 16-token margin for the chat template.
    """

    def __init__(
        self,
        attempts: int = 3,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        retry_temperature: float = 1.0,
        use_answer: bool = False,
        drop_leaks: bool = True,
        system_prompt: str = HINT_SYSTEM,
    ) -> None:
        super().__init__(use_answer)
        if attempts < 1:
            raise ConfigError("model.sampler.hints.attempts", f"must be >= 1, got {attempts}")
        if max_new_tokens < 1:
            raise ConfigError("model.sampler.hints.max_new_tokens", f"must be >= 1, got {max_new_tokens}")
        for name, t in (("temperature", temperature), ("retry_temperature", retry_temperature)):
            if t < 0:
                raise ConfigError(f"model.sampler.hints.{name}", f"must be >= 0 (0 is greedy), got {t}")
        self.attempts, self.max_new_tokens = attempts, max_new_tokens
        self.temperature, self.retry_temperature = temperature, retry_temperature
        self.drop_leaks, self.system_prompt = drop_leaks, system_prompt

    def messages(self, prompt: Prompt, solution: str, levels: int) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": HINT_USER.format(problem=bare_question(prompt), solution=solution)},
        ]

    def _fits(self, conv: list[dict[str, str]], handle: Any) -> bool:
        if self.context_limit is None:
            return True
        n = len(handle.context_of("\n".join(m["content"] for m in conv))) + 16
        return n + self.max_new_tokens <= self.context_limit

    def hints(self, prompts: list[Prompt], levels: int, handle: Any) -> list[dict[int, str] | None]:
        out: list[dict[int, str] | None] = [None] * len(prompts)
        convs = {i: self.messages(p, self.solution(p), levels) for i, p in enumerate(prompts) if self.solution(p)}
        todo = [i for i, c in convs.items() if self._fits(c, handle)]
        self.stats["hint/skipped_overflow"] += len(convs) - len(todo)
        for attempt in range(self.attempts):
            if not todo:
                break
            replies = handle.generate_text(
                [convs[i] for i in todo],
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature if attempt == 0 else self.retry_temperature,
            )
            self.stats["hint/generate_attempts"] += len(todo)
            still = []
            for i, reply in zip(todo, replies, strict=True):
                parsed, how = parse_hint_reply(reply, levels)
                if parsed is None:
                    still.append(i)
                elif self.drop_leaks and any(leaks_answer(prompts[i].answer, h) for h in parsed.values()):
                    self.stats["hint/generate_leaked"] += 1  # not retried: the policy would likely leak again
                else:
                    out[i] = parsed
                    self.stats["hint/parse_fallback_text"] += how == "text"
            todo = still
        return out
