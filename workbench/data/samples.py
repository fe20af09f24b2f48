"""Real sample files that ship on PyPI inside the ``mskt`` 0.1.22 source distribution (MIT).

The sdist holds a real multi-echo knee series (``MESE_T2_dicom_data_anon``, GE 3T,
24 slices x 8 echoes) and two real knee label maps.  They are fetched once with
``pip download`` and cached; nothing here is committed to the repository.

The cache folder is ``$WORKBENCH_CACHE`` when set, else ``~/.cache/workbench``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from workbench.errors import InputNotFound

MSKT_VERSION = "0.1.22"
#: Members of the sdist's ``data/`` folder the workbench uses (only the anonymised MESE copy).
MSKT_MEMBERS = (
    "MESE_T2_dicom_data_anon/",
    "right_knee_example.nrrd",
    "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd",
)


def cache_dir() -> Path:
    """The workbench's download cache (``$WORKBENCH_CACHE`` or ``~/.cache/workbench``)."""
    root = os.environ.get("WORKBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "workbench"


def mskt_data_dir(fetch: bool = True) -> Path:
    """Folder holding the cached ``mskt`` sample files, fetching them with pip if needed.

    Raises :class:`~workbench.errors.InputNotFound` when the files are absent and
    ``fetch`` is false or the download fails.
    """
    target = cache_dir() / f"mskt-{MSKT_VERSION}" / "data"
    if _complete(target):
        return target
    if not fetch:
        raise InputNotFound(
            f"The mskt {MSKT_VERSION} sample data is not in {target}",
            "Run `workbench data fetch` (needs access to PyPI once) or set WORKBENCH_CACHE.",
        )
    _fetch_mskt(target)
    return target


def mese_dir(fetch: bool = True) -> Path:
    """The real multi-echo knee DICOM series (GE 3T, 24 slices x 8 echoes)."""
    return mskt_data_dir(fetch) / "MESE_T2_dicom_data_anon"


def label_map_paths(fetch: bool = True) -> dict[str, Path]:
    """The two real knee label maps (NRRD) by short name."""
    data = mskt_data_dir(fetch)
    return {
        "right_knee_example": data / "right_knee_example.nrrd",
        "sag_3d_dess": data / "SAG_3D_DESS_RIGHT_bones_cart_men_fib-label.nrrd",
    }


def _complete(target: Path) -> bool:
    return (target / ".complete").exists()


def _fetch_mskt(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "mskt",
            f"mskt=={MSKT_VERSION}", "-d", tmp, "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("mskt-*.tar.gz"))
        if proc.returncode != 0 and not archives:
            raise InputNotFound(
                f"Could not download the mskt {MSKT_VERSION} sdist: {proc.stderr.strip().splitlines()[-1:]}",
                "Check access to PyPI, or place the sdist's data/ folder in the cache by hand.",
            )
        staging = Path(tmp) / "data"
        prefix = f"mskt-{MSKT_VERSION}/data/"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                if not member.name.startswith(prefix) or not member.isfile():
                    continue
                rel = member.name[len(prefix):]
                if not any(rel == m or rel.startswith(m) for m in MSKT_MEMBERS if m):
                    continue
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            # keep the package metadata (it states the MIT licence) beside the data
            with tar.extractfile(f"mskt-{MSKT_VERSION}/PKG-INFO") as src, open(staging / "PKG-INFO.mskt", "wb") as dst:
                shutil.copyfileobj(src, dst)
        (staging / ".complete").write_text(f"mskt {MSKT_VERSION}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)


#: Keys of the paths :func:`write_sample` returns.
SAMPLE_KEYS = ("dicom", "image", "labels", "case")


def write_sample(out_dir: str | Path, *, preset: str = "small", seed: int = 0, source: str | None = None,
                 name: str = "knee_sample", flip: bool = False, n_echoes: int = 0) -> dict[str, Path]:
    """Write the bundled synthetic knee case into ``out_dir`` and return its paths.

    The case is made by :mod:`workbench.data.synthetic_knee` from a real knee
    label map (fetched once, see :func:`mskt_data_dir`): a DICOM series
    (``dicom``), the same image as NIfTI (``image``), the ground-truth labels
    (``labels``) and the case's parameters (``case``).  An existing complete
    case with the same settings is reused.
    """
    import json

    from workbench.data.synthetic_knee import SyntheticKneeConfig, generate_case, write_case

    out_dir = Path(out_dir)
    settings = {"preset": preset, "seed": seed, "source": source, "flip": flip, "n_echoes": n_echoes}
    stamp = out_dir / f"{name}.sample.json"
    if stamp.is_file():
        saved = json.loads(stamp.read_text())
        paths = {k: Path(v) for k, v in saved.get("paths", {}).items()}
        if saved.get("settings") == settings and paths and all(p.exists() for p in paths.values()):
            return paths
    config = SyntheticKneeConfig.from_preset(preset, seed=seed, source=source, flip=flip, n_echoes=n_echoes)
    written = write_case(generate_case(config), out_dir, name)
    paths = {key: Path(written[key]) for key in SAMPLE_KEYS}
    stamp.write_text(json.dumps({"settings": settings, "paths": {k: str(v) for k, v in paths.items()}}, indent=2))
    return paths


def knee_sample_options(folder: str | Path) -> dict[str, str]:
    """Write the small knee sample into ``folder``; return the knee options that run it (with its ground truth)."""
    paths = write_sample(folder, preset="small", seed=0, name="knee_sample")
    return {"input": str(paths["dicom"]), "ground_truth": str(paths["labels"])}

