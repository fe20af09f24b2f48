"""The ``workbench`` command line.

Exit codes: 0 success, 2 usage or configuration error, 3 pipeline failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from workbench.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    WorkbenchError,
    exit_code_for,
)

EPILOG_RUN_KNEE = """examples:
  workbench run knee --input data/knee_dicom/
  workbench run knee --input knee.nii.gz --segmentation-model nnunet_cascade --nsm both --device cpu
  workbench run knee --input scans/ --series 5 --out outputs/my-run --timeout 900
  workbench run knee --input knee.nii.gz --model-dir ~/models/Dataset123_Knee --set nnunet.folds=[0,1,2,3,4] \
      --set nnunet.checkpoint=checkpoint_best.pth --set nnunet.use_mirroring=true --set nnunet.tile_step_size=0.5
  workbench run knee --input knee.nii.gz --segmentation my_labels.nii.gz     # analyse a manual segmentation
  workbench run knee --input mese_dicom/ --t2 on                              # T2 required (multi-echo input)
"""
EPILOG_RUN_RECON = """examples:
  workbench data sample recon --shape torus --views 64 --res 128 --out data/torus
  workbench run recon --images data/torus                         # nvdiffrec, cpu preset
  workbench run recon --images nerf_synthetic/lego --preset paper --device cuda
  workbench run recon --images my_object/ --set nvdiffrec.iter=3000 --set dmtet_grid=48   # bare upstream keys work too
input formats: docs/recon-inputs.md; config keys and presets: configs/recon.yaml
"""
EPILOG_DATA = """examples:
  workbench data fetch
  workbench data sample knee --out data/sample
  workbench data sample knee --out data/big --preset standard --seed 3 --flip
  workbench data sample recon --shape torus --views 64 --res 128 --out data/torus
  workbench data sample recon --mesh spot.obj --views 64 --res 128 --out data/spot
"""


class _Parser(argparse.ArgumentParser):
    """argparse that exits with the workbench's usage code (2) and a hint."""

    def error(self, message: str):  # noqa: D401
        self.print_usage(sys.stderr)
        print(f"error: {message}\nhint: run `{self.prog} --help` for the options and examples.", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _step_timeout(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return name.strip(), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS (e.g. load_input=120), got {text!r}") from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. nnunet.use_mirroring=true), got {text!r}")
    return key.strip(), value


def _add_limits_and_overrides(parser: argparse.ArgumentParser, *, step_example: str, set_example: str,
                              config_file: str) -> None:
    """The options every ``workbench run PIPELINE`` has: --timeout, --step-timeout, --set, --no-report."""
    parser.add_argument("--timeout", dest="timeout_s", type=float, help="limit for the whole run in seconds")
    parser.add_argument("--step-timeout", dest="step_timeouts", type=_step_timeout, action="append", default=[],
                        metavar="STEP=SECONDS", help=f"limit for one step (repeatable), e.g. {step_example}")
    parser.add_argument("--set", dest="overrides", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help=f"set a job-config key (repeatable), e.g. {set_example}; see {config_file}")
    parser.add_argument("--no-report", action="store_true", help="skip building report.html")


def build_parser() -> argparse.ArgumentParser:
    from workbench.registry import REGISTRY

    parser = _Parser(prog="workbench", description="Research workbench: knee MRI analysis and 3D reconstruction.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n  workbench demo\n  workbench run knee --input scan.nii.gz\n"
                            "  workbench data sample knee --out data/sample\n\n"
                            "Run `workbench COMMAND --help` for each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"workbench {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # run ------------------------------------------------------------------------------
    run = sub.add_parser("run", help="run a pipeline headless (papermill) into a run folder",
                         epilog=EPILOG_RUN_KNEE, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Run a pipeline's notebook headless into a run folder holding report.ipynb, "
                                     "report.html, result.json, config.json, progress.jsonl and the outputs.")
    run_sub = run.add_subparsers(dest="pipeline", required=True, parser_class=_Parser)
    knee = run_sub.add_parser(
        "knee", help=REGISTRY.pipeline("knee").description, epilog=EPILOG_RUN_KNEE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Knee MRI pipeline on a DICOM series or a 3-D NIfTI volume.")
    knee.add_argument("--input", required=True, help="DICOM folder/file or NIfTI volume (.nii, .nii.gz)")
    knee.add_argument("--out", help="run folder (default: a new folder under outputs/)")
    knee.add_argument("--segmentation-model", default="nnunet_fullres",
                      choices=REGISTRY.choices("knee", "segmentation_model"), help="default: %(default)s")
    knee.add_argument("--nsm", dest="nsm_type", default="none", choices=REGISTRY.choices("knee", "nsm_type"),
                      help="neural shape model fits (default: %(default)s)")
    knee.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    knee.add_argument("--series", help="DICOM series (UID, number or description) when the folder holds several")
    knee.add_argument("--model-dir", help="an nnU-Net v2 model folder to use instead of the shipped model")
    knee.add_argument("--ground-truth", help="label map in the input's space, to compare with")
    knee.add_argument("--segmentation", help="analyse this label map (input's space, workbench labels) "
                                             "instead of segmenting")
    knee.add_argument("--t2", default="auto", choices=("auto", "on", "off"),
                      help="T2 mapping: auto (when the input is multi-echo), on (required), off (default: auto)")
    knee.add_argument("--resample-mm", type=float, help="resample to this isotropic voxel size (mm)")
    _add_limits_and_overrides(knee, step_example="load_input=120", set_example="nnunet.use_mirroring=true",
                              config_file="configs/knee.yaml")

    recon = run_sub.add_parser(
        "recon", help=REGISTRY.pipeline("recon").description, epilog=EPILOG_RUN_RECON,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recon.add_argument("--images", required=True,
                       help="NeRF-synthetic folder (transforms_*.json) or images/ + masks/ + cameras.json")
    recon.add_argument("--out", help="run folder (default: a new folder under outputs/)")
    recon.add_argument("--model", default="nvdiffrec", choices=REGISTRY.choices("recon", "model"),
                       help="default: %(default)s")
    recon.add_argument("--preset", default="cpu", choices=("cpu", "default", "paper"),
                       help="settings preset from configs/recon.yaml (default: %(default)s)")
    recon.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    recon.add_argument("--resolution", type=int, help="resize the views' short side to this on load")
    _add_limits_and_overrides(recon, step_example="nvdiffrec=3600", set_example="nvdiffrec.iter=800",
                              config_file="configs/recon.yaml")

    # data -----------------------------------------------------------------------------
    data = sub.add_parser("data", help="sample and synthetic data", epilog=EPILOG_DATA,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    data_sub.add_parser("fetch", help="download and cache the real sample files (mskt sdist from PyPI)",
                        description="Fetch the mskt 0.1.22 sdist with pip once and cache its data "
                                    "(set WORKBENCH_CACHE to choose where).",
                        epilog="examples:\n  workbench data fetch\n  WORKBENCH_CACHE=/scratch/wb workbench data fetch",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sample = data_sub.add_parser("sample", help="write a synthetic sample case", epilog=EPILOG_DATA,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_argument("pipeline", choices=["knee", "recon"], help="which pipeline's sample")
    sample.add_argument("--out", required=True, help="folder to write the case into")
    sample.add_argument("--preset", default="small", help="knee: resolution preset (small, standard); default small")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sample.add_argument("--source", default=None, help="source label map (right_knee_example or sag_3d_dess)")
    sample.add_argument("--name", default="knee_sample", help="case name (default knee_sample)")
    sample.add_argument("--flip", action="store_true", help="mirror to a left knee")
    sample.add_argument("--echoes", type=int, default=0, help="write a multi-echo series with this many echoes")
    sample.add_argument("--shape", default=None,
                        help="recon: procedural shape (sphere, torus, blob, box); default torus unless --mesh")
    sample.add_argument("--mesh", default=None, help="recon: a mesh file (OBJ with texture) to render instead")
    sample.add_argument("--views", type=int, default=64, help="recon: training views (default 64)")
    sample.add_argument("--test-views", type=int, default=16, help="recon: held-out test views (default 16)")
    sample.add_argument("--res", type=int, default=128, help="recon: image size in pixels (default 128)")

    # models ---------------------------------------------------------------------------
    models = sub.add_parser("models", help="list and verify models",
                            epilog="examples:\n  workbench models list\n  workbench models verify",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    models_sub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    lst = models_sub.add_parser("list", help="registered models and shipped model folders",
                                epilog="examples:\n  workbench models list\n  workbench models list --json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    ver = models_sub.add_parser("verify", help="check the sha256 of every shipped weight file",
                                epilog="examples:\n  workbench models verify\n  workbench models verify models/knee_nnunet",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ver.add_argument("folders", nargs="*", help="model folders (default: every folder under models/)")

    # demo -----------------------------------------------------------------------------
    demo = sub.add_parser("demo", help="run the quickstart notebook headless on the bundled sample",
                          epilog="examples:\n  workbench demo\n  workbench demo --out outputs/demo",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--out", help="folder for the demo (default: a new folder under outputs/)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic sample (default 0)")

    # report ---------------------------------------------------------------------------
    report = sub.add_parser(
        "report", help="(re)build the HTML report of a run, or the gallery of all runs in a folder",
        description="Rebuild a run folder's report.html (and thumbnail.png) from its report.ipynb, or, with "
                    "--index, write DIR/index.html: an offline, sortable gallery of every run folder under DIR.",
        epilog="examples:\n  workbench report outputs/20261125-101500-knee-1a2b3c\n"
               "  workbench report --index outputs          # writes outputs/index.html\n"
               "  workbench report outputs/my-run --index outputs\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("run_dir", nargs="?", help="a run folder holding report.ipynb")
    report.add_argument("--index", metavar="DIR",
                        help="write DIR/index.html, a gallery of the run folders under DIR (up to 3 levels down)")
    return parser


def _version() -> str:
    from workbench import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = {"run": cmd_run, "data": cmd_data, "models": cmd_models, "report": cmd_report,
                   "demo": cmd_demo}[args.command]
        return handler(args)
    except WorkbenchError as exc:
        _print_error(exc)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_FAILURE


def _print_error(error: WorkbenchError, log: Path | None = None) -> None:
    print(f"error [{error.code.value}]: {error.message}", file=sys.stderr)
    print(f"hint: {error.hint}", file=sys.stderr)
    if log is not None and log.exists():
        print(f"details: {log}", file=sys.stderr)


def _absolute(path: str | None) -> str | None:
    """A path given on the command line, made absolute (the notebook runs in the run folder)."""
    return path if path is None or not path.strip() else str(Path(path).expanduser().resolve())


def knee_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The knee notebook's parameters (plain types) from parsed ``workbench run knee`` arguments."""
    return {
        "input": _absolute(args.input), "segmentation_model": args.segmentation_model, "nsm_type": args.nsm_type,
        "device": args.device, "series": args.series, "model_dir": _absolute(args.model_dir),
        "ground_truth": _absolute(args.ground_truth), "segmentation": _absolute(args.segmentation), "t2": args.t2,
        "resample_mm": args.resample_mm, "timeout_s": args.timeout_s,
        "step_timeouts": dict(args.step_timeouts), "overrides": dict(args.overrides),
    }


def recon_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The reconstruction notebook's parameters (plain types) from parsed ``workbench run recon`` arguments."""
    return {
        "images": _absolute(args.images), "model": args.model, "preset": args.preset, "device": args.device,
        "resolution": args.resolution, "timeout_s": args.timeout_s,
        "step_timeouts": dict(args.step_timeouts), "overrides": dict(args.overrides),
    }


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.config import notebook_timeout_s, validate_job
    from workbench.notebook import run_job
    from workbench.runner import new_run_dir

    options = recon_parameters(args) if args.pipeline == "recon" else knee_parameters(args)
    validated = validate_job(args.pipeline, options)  # CONFIG_ERROR (exit 2) before anything is written
    run_dir = Path(args.out) if args.out else new_run_dir(args.pipeline)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--out {run_dir} is not empty", "Give a new or empty folder, or leave --out out.")
    print(f"run folder: {run_dir.resolve()}", file=sys.stderr)
    result = run_job(args.pipeline, options, run_dir, timeout_s=notebook_timeout_s(args.pipeline, validated),
                     report=not args.no_report)
    if result["status"] == "ok":
        print(f"ok: {len(result['steps'])} steps in {result['seconds']:.1f} s", file=sys.stderr)
        report = run_dir / "report.html"
        print(report.resolve() if report.exists() else run_dir.resolve())
        return EXIT_OK
    error = WorkbenchError.from_dict(result["error"])
    _print_error(error, run_dir / "error.log")
    print(f"run folder: {run_dir.resolve()}", file=sys.stderr)
    return exit_code_for(error)


def cmd_data(args: argparse.Namespace) -> int:
    from workbench.data import samples

    if args.data_command == "fetch":
        print(samples.mskt_data_dir(fetch=True))
        return EXIT_OK
    if args.pipeline == "recon":
        from workbench.data.synthetic_scenes import sample_recon

        if args.shape and args.mesh:
            raise ConfigError("Give --shape or --mesh, not both")
        folder = sample_recon(shape=None if args.mesh else (args.shape or "torus"),
                              mesh=Path(args.mesh) if args.mesh else None, views=args.views, res=args.res,
                              out=Path(args.out), test_views=args.test_views, seed=args.seed)
        print(folder)
        return EXIT_OK
    from workbench.data.samples import write_sample

    paths = write_sample(Path(args.out), preset=args.preset, seed=args.seed, source=args.source, name=args.name,
                         flip=args.flip, n_echoes=args.echoes)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from workbench.models import list_model_folders, verify_model_folder
    from workbench.registry import REGISTRY

    if args.models_command == "list":
        folders = list_model_folders()
        if args.json:
            print(json.dumps({
                "registered": [{"name": m.name, "pipeline": m.pipeline, "option": m.option,
                                "description": m.description, "config": _jsonable(m.config_fields())}
                               for m in REGISTRY.models.values()],
                "folders": [{"name": f.name, "path": str(f.path), **{k: v for k, v in f.metadata.items()
                                                                      if k != "files"}} for f in folders],
            }, indent=2))
            return EXIT_OK
        print("registered models:")
        for m in REGISTRY.models.values():
            print(f"  {m.pipeline:6s} {m.option:20s} {m.name:16s} {m.description}")
        print("model folders:" if folders else "model folders: none shipped yet under models/")
        for f in folders:
            print(f"  {f.name:24s} v{f.metadata.get('version', '?'):6s} {f.path}")
        return EXIT_OK
    from workbench.config import models_dir

    targets = [Path(p) for p in args.folders] or [f.path for f in list_model_folders(models_dir())]
    if not targets:
        print(f"no model folders with metadata.json under {models_dir()}")
        return EXIT_OK
    failed = 0
    for path in targets:
        report = verify_model_folder(path)
        if report.ok:
            print(f"ok      {report.name} ({report.files_checked} files)")
        else:
            failed += 1
            print(f"FAILED  {report.name}: " + "; ".join(report.problems))
    if failed:
        _print_error(WorkbenchError(f"{failed} model folder(s) failed verification", code="MODEL_UNAVAILABLE",
                                    hint="Restore the files from the repository (git checkout -- models/)."))
        return EXIT_FAILURE
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.notebook import run_quickstart
    from workbench.runner import new_run_dir

    out = Path(args.out) if args.out else new_run_dir("demo")
    print(f"demo folder: {out.resolve()}", file=sys.stderr)
    try:
        report = run_quickstart(out, seed=args.seed)
    except Exception as exc:
        from workbench.notebook import _notebook_error

        error = _notebook_error(exc)
        _print_error(error)
        print(f"report of the failed demo: {out.resolve() / 'report.html'}", file=sys.stderr)
        return exit_code_for(error)
    print(report)
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    if not args.run_dir and not args.index:
        raise ConfigError("Give a run folder, --index DIR, or both",
                          "e.g. `workbench report outputs/my-run` or `workbench report --index outputs`.")
    if args.run_dir:
        from workbench.notebook import build_report

        print(build_report(Path(args.run_dir)))
    if args.index:
        from workbench.ui.gallery import write_index

        print(write_index(Path(args.index)))
    return EXIT_OK


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
