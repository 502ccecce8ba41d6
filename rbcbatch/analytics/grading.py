"""Grading schemes: cut-offs that turn a patient's indicators into grades (0 / 1+ / 2+ / 3+, ...).

A scheme is data, not code: a YAML table of percentage cut-offs per red-cell feature, checked
against `grading_schema()` (published as schemas/grading.schema.json). Two ship beside this file
(icsh2015, cap_simple); a laboratory's own table is a YAML file of the same shape. The `patients`
view turns each feature's cut-offs into a SQL CASE (`grade_case_sql`), so changing a grade
never means changing code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from rbcbatch.errors import GradingSchemeError
from rbcbatch.vocabulary import MORPHOLOGY_CLASSES

SHIPPED_DIR = Path(__file__).parent / "schemes"
DEFAULT_SCHEME = "icsh2015"

# Morphology classes in the order indicators are reported: spherocytes (the HS screen) first.
REPORT_CLASSES: tuple[str, ...] = (
    "spherocyte",
    *(c for c in MORPHOLOGY_CLASSES if c != "spherocyte"),
)

# Feature a scheme may grade -> the `patients` column it reads. Every class but "normal" and
# "other" (a share of normal cells, or of cells no rule names, has no grade), the share of
# poikilocytes and the spread of diameters (anisocytosis, as a CV in %).
GRADED_FEATURES: dict[str, str] = {
    **{c: f"{c}_pct" for c in REPORT_CLASSES if c not in ("normal", "other")},
    "poikilocytosis": "poikilocyte_pct",
    "anisocytosis": "diameter_cv_pct",
}

# Grade names end up in SQL string literals and report tables: short, no quotes.
_GRADE_PATTERN = r"^[A-Za-z0-9+ _-]{1,20}$"


@dataclass(frozen=True)
class Cutoff:
    """The lower edge of one grade: value >= threshold (inclusive) or value > threshold."""

    grade: str
    threshold: float
    inclusive: bool

    def describe(self) -> str:
        return f"{'>=' if self.inclusive else '>'} {self.threshold:g}"


@dataclass(frozen=True)
class GradingScheme:
    """A loaded, checked scheme. grades[0] is given below the first cut-off of a feature."""

    name: str
    title: str
    reference: str
    grades: tuple[str, ...]
    features: dict[str, tuple[Cutoff, ...]]
    path: str

    def case_sql(self, feature: str, value_sql: str) -> str | None:
        """A SQL CASE giving `feature`'s grade of the value `value_sql`; None when the scheme
        does not grade this feature. NULL values stay NULL."""
        cutoffs = self.features.get(feature)
        if not cutoffs:
            return None
        whens = " ".join(
            f"WHEN {value_sql} {'>=' if c.inclusive else '>'} {float(c.threshold)!r} "
            f"THEN {_sql_text(c.grade)}"
            for c in reversed(cutoffs)
        )
        return (
            f"CASE WHEN {value_sql} IS NULL THEN NULL {whens} ELSE {_sql_text(self.grades[0])} END"
        )

    def describe(self, feature: str) -> str:
        """One line per feature for people: '1+ >= 5, 2+ > 20, 3+ > 50 (% of red cells)'."""
        cutoffs = self.features.get(feature, ())
        return ", ".join(f"{c.grade} {c.describe()}" for c in cutoffs) or "not graded"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def grading_schema() -> dict:
    """The JSON schema (draft 2020-12) of a grading scheme file."""
    level = {
        "type": "object",
        "required": ["grade"],
        "properties": {
            "grade": {"type": "string", "pattern": _GRADE_PATTERN},
            "at_least": {
                "type": "number",
                "minimum": 0,
                "maximum": 100,
                "description": "The grade starts at this value (inclusive).",
            },
            "above": {
                "type": "number",
                "minimum": 0,
                "maximum": 100,
                "description": "The grade starts above this value (exclusive).",
            },
        },
        "additionalProperties": False,
        "oneOf": [{"required": ["at_least"]}, {"required": ["above"]}],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rbcbatch grading scheme",
        "description": "Percentage cut-offs per red-cell feature. A feature's levels go from "
        "the lowest grade up; a value below the first level gets the first entry of `grades`. "
        "Features: " + ", ".join(f"{k} (reads {v})" for k, v in GRADED_FEATURES.items()) + ".",
        "type": "object",
        "required": ["name", "grades", "features"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,64}$"},
            "title": {"type": "string"},
            "reference": {"type": "string", "description": "Where the cut-offs come from."},
            "grades": {
                "type": "array",
                "items": {"type": "string", "pattern": _GRADE_PATTERN},
                "minItems": 2,
                "uniqueItems": True,
                "description": "Grade names, lowest first.",
            },
            "features": {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"enum": list(GRADED_FEATURES)},
                "additionalProperties": {"type": "array", "minItems": 1, "items": level},
            },
        },
        "additionalProperties": False,
    }


def shipped_schemes() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def _resolve(spec: str | Path) -> Path:
    """A shipped scheme's file for its name, else the path given."""
    text = str(spec)
    if re.fullmatch(r"[A-Za-z0-9_]+", text) and (SHIPPED_DIR / f"{text}.yaml").is_file():
        return SHIPPED_DIR / f"{text}.yaml"
    path = Path(text)
    if path.is_file():
        return path
    raise GradingSchemeError(
        f"unknown grading scheme {text!r}: neither a shipped scheme "
        f"({', '.join(shipped_schemes())}) nor a YAML file"
    )


def _problems(data: object) -> list[str]:
    """Everything wrong with a parsed scheme: schema errors, then order of grades and cut-offs."""
    errors = sorted(
        Draft202012Validator(grading_schema()).iter_errors(data), key=lambda e: list(e.path)
    )
    problems = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in errors
    ]
    if problems:
        return problems
    grades = list(data["grades"])
    for feature, levels in data["features"].items():
        ranks = [grades.index(lv["grade"]) if lv["grade"] in grades else -1 for lv in levels]
        thresholds = [lv.get("at_least", lv.get("above")) for lv in levels]
        if any(r < 1 for r in ranks):
            problems.append(
                f"features.{feature}: every level's grade must be one of {grades[1:]} "
                f"({grades[0]!r} is what a value below the first level gets)"
            )
        elif ranks != sorted(set(ranks)):
            problems.append(f"features.{feature}: grades must go up, in the order of `grades`")
        if thresholds != sorted(set(thresholds)):
            problems.append(
                f"features.{feature}: cut-offs must increase strictly, got {thresholds}"
            )
    return problems


def load_scheme(spec: str | Path | GradingScheme | None = None) -> GradingScheme:
    """A scheme by shipped name (icsh2015, cap_simple) or YAML path; default icsh2015."""
    if isinstance(spec, GradingScheme):
        return spec
    path = _resolve(spec or DEFAULT_SCHEME)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise GradingSchemeError(f"cannot read grading scheme {path}: {e}") from e
    problems = _problems(data)
    if problems:
        raise GradingSchemeError(
            f"{path} is not a valid grading scheme (schemas/grading.schema.json): "
            + "; ".join(problems)
        )
    features = {
        feature: tuple(
            Cutoff(lv["grade"], float(lv.get("at_least", lv.get("above"))), "at_least" in lv)
            for lv in levels
        )
        for feature, levels in data["features"].items()
    }
    return GradingScheme(
        name=data["name"],
        title=data.get("title", ""),
        reference=data.get("reference", ""),
        grades=tuple(data["grades"]),
        features=features,
        path=str(path),
    )
