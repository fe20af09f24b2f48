"""Error codes and typed exceptions of the workbench.

Every failure a user can see ends as a :class:`WorkbenchError` carrying an
:class:`ErrorCode`, a one-line message naming the offending file or option, and
a hint saying what to do.  Code inside the workbench raises the typed
subclasses; :func:`classify` turns foreign exceptions (CUDA out-of-memory, a
missing file, a killed child process) into the same shape, matching on type
first and on message text only as a fallback.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """The closed set of error codes written to ``result.json``."""

    TIMEOUT = "TIMEOUT"
    GPU_OOM = "GPU_OOM"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    INVALID_FORMAT = "INVALID_FORMAT"
    DICOM_ERROR = "DICOM_ERROR"
    PIPELINE_ERROR = "PIPELINE_ERROR"
    CONFIG_ERROR = "CONFIG_ERROR"
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    SEGMENTATION_FAILED = "SEGMENTATION_FAILED"
    NSM_FAILED = "NSM_FAILED"
    RECONSTRUCTION_FAILED = "RECONSTRUCTION_FAILED"
    CANCELLED = "CANCELLED"


DEFAULT_HINTS: dict[ErrorCode, str] = {
    ErrorCode.TIMEOUT: "Raise the step's timeout in the config (timeouts.*) or use a smaller input or a faster device.",
    ErrorCode.GPU_OOM: "Lower the tile/batch size, close other GPU jobs, or run with --device cpu.",
    ErrorCode.FILE_NOT_FOUND: "Check the path; relative paths are resolved from the current directory.",
    ErrorCode.INVALID_FORMAT: "Give a DICOM folder or a 3-D NIfTI (.nii/.nii.gz) volume.",
    ErrorCode.DICOM_ERROR: "Check that the folder holds one complete DICOM series; see error.log for details.",
    ErrorCode.PIPELINE_ERROR: "An unexpected error; the traceback is in error.log in the run folder.",
    ErrorCode.CONFIG_ERROR: "Check the option's spelling and allowed values (workbench run --help).",
    ErrorCode.MODEL_UNAVAILABLE: "Check the model folder (workbench models list / verify) or point --model-dir at one.",
    ErrorCode.SEGMENTATION_FAILED: "Check the input image; the traceback is in error.log.",
    ErrorCode.NSM_FAILED: "The shape model fit failed; the other results are kept. See error.log.",
    ErrorCode.RECONSTRUCTION_FAILED: "Lower the learning rate or check the cameras and masks; see error.log.",
    ErrorCode.CANCELLED: "The run was cancelled; start it again when ready.",
}


class WorkbenchError(Exception):
    """Base of all workbench errors: a code, a one-line message and a hint."""

    code: ErrorCode = ErrorCode.PIPELINE_ERROR

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        code: ErrorCode | str | None = None,
        step: str | None = None,
    ) -> None:
        if code is not None:
            self.code = ErrorCode(code)
        self.message = " ".join(str(message).split())  # one line
        self.hint = hint or DEFAULT_HINTS[self.code]
        self.step = step
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def __reduce__(self):  # keep code/hint/step across pickling (child -> parent)
        return (_rebuild_error, (type(self), self.message, self.hint, self.code.value, self.step))

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of ``result.json``."""
        return {"code": self.code.value, "message": self.message, "hint": self.hint, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkbenchError":
        """Rebuild an error from its ``result.json`` form (the subclass of its code)."""
        klass = _CLASS_BY_CODE.get(ErrorCode(data["code"]), WorkbenchError)
        return klass(data["message"], data.get("hint"), code=data["code"], step=data.get("step"))


def _rebuild_error(klass, message, hint, code, step):
    return klass(message, hint, code=code, step=step)


class StepTimeout(WorkbenchError):
    code = ErrorCode.TIMEOUT


class GpuOutOfMemory(WorkbenchError):
    code = ErrorCode.GPU_OOM


class InputNotFound(WorkbenchError):
    code = ErrorCode.FILE_NOT_FOUND


class InvalidFormat(WorkbenchError):
    code = ErrorCode.INVALID_FORMAT


class DicomError(WorkbenchError):
    code = ErrorCode.DICOM_ERROR


class PipelineError(WorkbenchError):
    code = ErrorCode.PIPELINE_ERROR


class ConfigError(WorkbenchError):
    code = ErrorCode.CONFIG_ERROR


class ModelUnavailable(WorkbenchError):
    code = ErrorCode.MODEL_UNAVAILABLE


class SegmentationFailed(WorkbenchError):
    code = ErrorCode.SEGMENTATION_FAILED


class NsmFailed(WorkbenchError):
    code = ErrorCode.NSM_FAILED


class ReconstructionFailed(WorkbenchError):
    code = ErrorCode.RECONSTRUCTION_FAILED


class Cancelled(WorkbenchError):
    code = ErrorCode.CANCELLED


_CLASS_BY_CODE: dict[ErrorCode, type[WorkbenchError]] = {
    klass.code: klass
    for klass in (
        StepTimeout, GpuOutOfMemory, InputNotFound, InvalidFormat, DicomError, PipelineError,
        ConfigError, ModelUnavailable, SegmentationFailed, NsmFailed, ReconstructionFailed, Cancelled,
    )
}

_OOM_TEXT = ("cuda out of memory", "cudaerrormemoryallocation", "cublas_status_alloc_failed", "out of memory")


def classify(exc: BaseException, *, step: str | None = None, default: ErrorCode = ErrorCode.PIPELINE_ERROR) -> WorkbenchError:
    """Return ``exc`` as a :class:`WorkbenchError`.

    Workbench errors pass through (with ``step`` filled in).  Foreign errors are
    matched by type first (``torch.cuda.OutOfMemoryError``, ``FileNotFoundError``,
    ``MemoryError``, ``KeyboardInterrupt``) and by message text only as a
    fallback; anything else becomes ``default`` with the original message.
    """
    if isinstance(exc, WorkbenchError):
        if exc.step is None:
            exc.step = step
        return exc
    text = f"{type(exc).__name__}: {exc}"
    try:
        import torch  # local: errors must import without torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return GpuOutOfMemory(f"GPU out of memory in step {step!r}: {_first_line(exc)}", step=step)
    except Exception:  # torch missing or broken: fall through to text matching
        pass
    if isinstance(exc, FileNotFoundError):
        name = getattr(exc, "filename", None) or _first_line(exc)
        return InputNotFound(f"File not found: {name}", step=step)
    if isinstance(exc, KeyboardInterrupt):
        return Cancelled("Interrupted by the user", step=step)
    if isinstance(exc, MemoryError):
        return PipelineError(
            f"Out of host memory in step {step!r}", "Use a smaller input or a machine with more RAM.", step=step
        )
    lowered = text.lower()
    if any(t in lowered for t in _OOM_TEXT) and ("cuda" in lowered or "gpu" in lowered):
        return GpuOutOfMemory(f"GPU out of memory in step {step!r}: {_first_line(exc)}", step=step)
    return _CLASS_BY_CODE.get(default, WorkbenchError)(
        f"{type(exc).__name__}: {_first_line(exc)}", code=default, step=step
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


#: CLI exit codes.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILURE = 3


def exit_code_for(error: WorkbenchError | None) -> int:
    """0 for success, 2 for usage/configuration errors, 3 for pipeline failures."""
    if error is None:
        return EXIT_OK
    return EXIT_USAGE if error.code is ErrorCode.CONFIG_ERROR else EXIT_FAILURE
