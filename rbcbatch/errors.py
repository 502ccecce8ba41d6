"""The few exceptions rbcbatch raises on purpose.

Each carries the data a failures row needs (which slide, which stage), so that a bad slide is
recorded with its reason and the run goes on.
"""

from __future__ import annotations

from dataclasses import dataclass


class RbcbatchError(Exception):
    """Base class: an error with a message meant for the person running rbcbatch."""


class CatalogError(RbcbatchError):
    """The catalog as a whole cannot be used (missing file, missing columns, unreadable)."""


class SlideError(RbcbatchError):
    """One slide failed at one stage; the run records it and goes on."""

    def __init__(self, slide_id: str, stage: str, message: str):
        super().__init__(f"{slide_id}: {message}")
        self.slide_id = slide_id
        self.stage = stage
        self.message = message


class SlideReadError(SlideError):
    """The slide's bytes could not be read or decoded as an image."""

    def __init__(self, slide_id: str, message: str):
        super().__init__(slide_id, "read", message)


class RunDirError(RbcbatchError):
    """The output folder holds a run that this invocation must not mix with."""


class RunFolderInUseError(RunDirError):
    """Another `rbcbatch run` holds the output folder's lease."""


class WeightsError(RbcbatchError):
    """A model's weights file is missing, corrupt or does not match its card."""


class JobSpecError(RbcbatchError):
    """A job spec is not a valid job; each problem names its field by JSON path ($.catalog)."""

    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems


class RunStalledError(RbcbatchError):
    """No slide moved through the pool for the stall timeout: the cluster cannot finish the run
    (a lost node nothing replaces, a read that never returns). Committed slides stay committed."""


class GradingSchemeError(RbcbatchError, ValueError):
    """A grading scheme cannot be found or is not a valid table of cut-offs."""


class DeidentifyError(RbcbatchError):
    """De-identification cannot be done safely (no key, a weak key, or a folder of other ids)."""


@dataclass(frozen=True)
class Failure:
    """One row of failures.parquet: which slide, at which stage, and why."""

    slide_id: str
    uri: str
    stage: str
    error_type: str
    message: str

    @classmethod
    def from_exception(cls, slide_id: str, uri: str, stage: str, exc: BaseException) -> Failure:
        if isinstance(exc, SlideError):
            stage, message = exc.stage, exc.message
        else:
            message = str(exc) or repr(exc)
        return cls(slide_id, uri, stage, type(exc).__name__, message)
