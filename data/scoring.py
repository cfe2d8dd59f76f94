"""MMAU scoring: the official scorer's rules (docs/FACTS.md, "MMAU scoring"), pure Python.

Behaviour matched against the MMAU repository's ``evaluation.py`` (its
``string_match`` and main loop, as copied into several public projects):

* the prediction is used as given: lower-cased, then the *set* of ``\\b\\w+\\b``
  tokens. No punctuation stripping, no option-letter mapping: a bare ``"A"``
  is the token ``a`` and is correct only if the answer text itself is ``A``.
* correct iff the prediction has at least one token, every answer token is in
  it, and it shares no token with the other choices once the answer's own
  tokens are removed from them. "The answer" is recognised by its *token set*:
  any choice whose token set equals the answer's (a duplicate, or the same
  text up to case and punctuation) contributes nothing.
* a sample without the prediction key is skipped (``continue``): it counts in
  no denominator. The script prints how many; we return their ids.
* accuracy of a group = correct / count * 100 over that group's counted
  samples (0 when the group is empty), printed with two decimals. We store it
  rounded to two decimals, so the JSON holds what the script prints.
* the official script reads ``model_output``; R1-AQA writes
  ``model_prediction``. We read ``model_output`` and fall back to
  ``model_prediction``; our prediction files carry both.

Two deliberate extensions, neither changing MMAU results:
* a prediction that is ``None`` (JSON null) is scored as an empty prediction
  (wrong) instead of crashing;
* records in R1-AQA's AVQA schema (``multi_choice`` + integer ``answer``) are
  scored by converting the index to the choice text, and MMAR records group
  their "task" by ``modality`` (MMAR has no ``task`` field), AVQA records without a
  ``task`` by ``question_type`` (as data.datasets.read_avqa does).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from data.quote import cut, quote

log = logging.getLogger(__name__)

# '.' does not match a newline, so an <answer> ... </answer> pair spanning a
# line break is not taken (R1-AQA's reward and test script use re.search with
# this pattern and no DOTALL flag: the first pair that fits on one line wins).
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")
_TOKEN_RE = re.compile(r"\b\w+\b")

# Keys read for the prediction, in order (official key first).
PREDICTION_KEYS = ("model_output", "model_prediction")

# Output group name -> record fields to try, in order.
GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "task": ("task", "modality", "question_type"),
    "difficulty": ("difficulty",),
    "sub-category": ("sub-category",),
}

# Display order for the well-known MMAU tasks; others follow alphabetically.
TASK_ORDER = ("sound", "music", "speech")


def extract_answer(text: str | None) -> str:
    """The text inside the first one-line ``<answer>...</answer>``, else the whole text; stripped."""
    if not text:
        return ""
    match = _ANSWER_RE.search(text)
    return (match.group(1) if match else text).strip()


def tokenize(text: str | None) -> set[str]:
    """Set of lower-cased word tokens (``\\b\\w+\\b``), as the official scorer builds it."""
    if not text:
        return set()
    return set(_TOKEN_RE.findall(str(text).lower()))


def is_correct(prediction: str | None, answer: str, choices: Sequence[str]) -> bool:
    """The official MMAU match: all answer tokens present, no token owned only by a wrong choice."""
    prediction_tokens = tokenize(prediction)
    if not prediction_tokens:
        return False
    answer_tokens = tokenize(answer)
    wrong_tokens: set[str] = set()
    for choice in choices:
        choice_tokens = tokenize(choice)
        if choice_tokens != answer_tokens:  # the answer itself, or a duplicate of it
            wrong_tokens |= choice_tokens - answer_tokens
    return answer_tokens <= prediction_tokens and prediction_tokens.isdisjoint(wrong_tokens)


def record_problem(record: Any, prediction_key: str | None = None) -> str | None:
    """What makes ``record`` unscorable, or None. A string in place of the choices list would
    otherwise be split into characters, and a missing answer raise a bare KeyError."""
    if not isinstance(record, Mapping):
        return f"a {type(record).__name__}, not an object"
    key = "choices" if "choices" in record else "multi_choice" if "multi_choice" in record else None
    if key is None:
        return "neither 'choices' nor 'multi_choice'"
    choices = record[key]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        return f"'{key}' must be a non-empty list of strings, got {quote(choices)}"
    if "answer" not in record:
        return "no 'answer'"
    answer = record["answer"]
    if key == "multi_choice" and isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            return f"answer index {quote(answer)} out of range for {len(choices)} choices"
    elif not isinstance(answer, str):
        return f"'answer' must be a string, got {quote(answer)}"
    for k in (prediction_key,) if prediction_key else PREDICTION_KEYS:
        if k in record and record[k] is not None and not isinstance(record[k], str):
            return f"prediction '{k}' must be a string or null, got {quote(record[k])}"
    return None


def answer_and_choices(record: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(answer text, choices) of a benchmark record: MMAU/MMAR schema or R1-AQA's AVQA schema."""
    problem = record_problem(record)
    if problem is not None:
        named = quote(record.get("id")) if isinstance(record, Mapping) else quote(record)
        raise ValueError(f"record {named}: {problem}")
    if "choices" in record:
        return str(record["answer"]), list(record["choices"])
    if "multi_choice" in record:
        choices = list(record["multi_choice"])
        answer = record["answer"]
        # AVQA stores the 0-based index of the correct choice.
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = choices[answer]
        return str(answer), choices
    raise KeyError(f"record {quote(record.get('id'))} has neither 'choices' nor 'multi_choice'")


def prediction_of(record: Mapping[str, Any], prediction_key: str | None = None) -> tuple[bool, str]:
    """(has a prediction key, prediction text). ``prediction_key=None`` reads the default order."""
    keys = (prediction_key,) if prediction_key else PREDICTION_KEYS
    for key in keys:
        if key in record:
            value = record[key]
            return True, "" if value is None else str(value)
    return False, ""


def group_value(record: Mapping[str, Any], group: str) -> str | None:
    for name in GROUP_FIELDS[group]:
        value = record.get(name)
        if value is not None and value != "":
            return str(value)
    return None


def _entry(correct: int, count: int) -> dict[str, Any]:
    accuracy = round(100.0 * correct / count, 2) if count else 0.0
    return {"correct": correct, "count": count, "accuracy": accuracy}


def ordered_groups(names: Iterable[str], group: str) -> list[str]:
    """Display order: MMAU's sound/music/speech first for tasks, easy/medium/hard, else sorted."""
    names = list(names)
    if group == "task":
        known = [t for t in TASK_ORDER if t in names]
        return known + sorted(n for n in names if n not in TASK_ORDER)
    if group == "difficulty":
        order = ("easy", "medium", "hard")
        return [d for d in order if d in names] + sorted(n for n in names if n not in order)
    return sorted(names)


@dataclass
class ScoreReport:
    """What :func:`score_report` found: the scores dict plus per-sample detail."""

    scores: dict[str, Any]
    # ids (or list positions when a record has no id) of samples left out: no prediction key
    no_prediction: list[Any] = field(default_factory=list)
    # per input item: True/False when scored, None when left out
    matches: list[bool | None] = field(default_factory=list)


def score_report(items: Sequence[Mapping[str, Any]], *, prediction_key: str | None = None) -> ScoreReport:
    """Score benchmark records carrying a prediction. See :func:`score` for the dict layout."""
    total = [0, 0]
    groups: dict[str, dict[str, list[int]]] = {g: {} for g in GROUP_FIELDS}
    no_prediction: list[Any] = []
    matches: list[bool | None] = []
    for position, record in enumerate(items):
        has_prediction, prediction = prediction_of(record, prediction_key)
        if not has_prediction:
            no_prediction.append(record.get("id", position))
            matches.append(None)
            continue
        answer, choices = answer_and_choices(record)
        ok = is_correct(prediction, answer, choices)
        matches.append(ok)
        total[0] += ok
        total[1] += 1
        for group, table in groups.items():
            value = group_value(record, group)
            if value is None:
                continue
            cell = table.setdefault(value, [0, 0])
            cell[0] += ok
            cell[1] += 1
    scores: dict[str, Any] = {"total": _entry(*total)}
    for group, table in groups.items():
        scores[group] = {name: _entry(*table[name]) for name in ordered_groups(table, group)}
    return ScoreReport(scores=scores, no_prediction=no_prediction, matches=matches)


def score(items: Sequence[Mapping[str, Any]], *, prediction_key: str | None = None) -> dict[str, Any]:
    """Scores dict of benchmark records with predictions, by MMAU's official rules.

    Keys are exactly ``total``, ``task``, ``difficulty``, ``sub-category``. ``total`` is
    ``{"correct", "count", "accuracy"}``; each group maps a value (e.g. ``"sound"``) to the same
    triple. ``accuracy`` is a percentage rounded to two decimals. Records without a prediction key
    are left out of every count and reported in the log (see :func:`score_report` for their ids).
    A group is empty when the records lack that field (AVQA has no difficulty, for instance).
    """
    report = score_report(items, prediction_key=prediction_key)
    if report.no_prediction:
        log.warning(
            "%d of %d samples have no prediction and are left out of the scores: %s",
            len(report.no_prediction), len(items), _preview(report.no_prediction),
        )
    return report.scores


def read_predictions(path: str | Path) -> list[dict]:
    """A benchmark-schema predictions file, every record checked: DataError naming the file and record."""
    from data.datasets import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit
        where = f"line {err.lineno} column {err.colno}: " if isinstance(err, json.JSONDecodeError) else ""
        raise DataError(f"{path}: {where}not valid JSON ({cut(getattr(err, 'msg', err), 200)})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a list of records") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    if not records:
        raise DataError(f"{path}: no records to score")
    for i, record in enumerate(records):
        problem = record_problem(record)
        if problem is not None:
            named = f" (id {quote(record['id'])})" if isinstance(record, dict) and "id" in record else ""
            raise DataError(f"{path}: record {i}{named}: {problem}")
    return records


def _preview(ids: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(cut(i, 60) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")
