"""JSON schemas of the files a run writes (documented in ``docs/result-schema.md``)."""

from __future__ import annotations

_ERROR = {
    "type": ["object", "null"],
    "required": ["code", "message", "hint", "step"],
    "properties": {
        "code": {"type": ["string", "null"]},
        "message": {"type": "string"},
        "hint": {"type": ["string", "null"]},
        "step": {"type": ["string", "null"]},
    },
}
_NUMBER_OR_NULL = {"type": ["number", "null"]}

#: Schema of ``result.json``.
RESULT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "workbench result.json",
    "type": "object",
    "required": ["schema_version", "status", "pipeline", "models", "parameters", "error", "steps", "outputs",
                 "metrics", "versions", "started", "ended"],
    "properties": {
        "schema_version": {"const": 1},
        "status": {"enum": ["running", "ok", "failed", "timeout", "cancelled"]},
        "pipeline": {"type": "string"},
        "models": {"type": "array", "items": {"type": "string"}},
        "parameters": {"type": "object"},
        "error": _ERROR,
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "status", "seconds", "peak_rss_mb", "peak_gpu_mb"],
                "properties": {
                    "name": {"type": "string"},
                    "status": {"enum": ["running", "ok", "failed", "skipped", "timeout", "cancelled"]},
                    "model": {"type": ["string", "null"]},
                    "seconds": {"type": "number", "minimum": 0},
                    "peak_rss_mb": _NUMBER_OR_NULL,
                    "peak_gpu_mb": _NUMBER_OR_NULL,
                    "gpu_after_mb": _NUMBER_OR_NULL,
                    "error": _ERROR,
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["path", "kind", "bytes", "sha256"],
                "properties": {
                    "path": {"type": "string"},
                    "kind": {"type": "string"},
                    "bytes": {"type": "integer", "minimum": 1},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                },
            },
        },
        "metrics": {"type": "object"},
        "versions": {
            "type": "object",
            "required": ["workbench", "python", "torch", "cuda", "git_commit"],
        },
        "device": {"type": ["string", "null"]},
        "started": {"type": "string"},
        "ended": {"type": ["string", "null"]},
        "seconds": {"type": "number"},
    },
}
