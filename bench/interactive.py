"""Benchmark: what interactive use and reports cost, on the bundled samples.

Parts (``--parts``, default all):

* ``launcher``: the same knee run (the synthetic sample, shipped ``nnunet_fullres``)
  started with ``workbench run knee`` and with the launcher's
  :class:`~workbench.ui.launcher.BackgroundJob`: wall time of each, time to the
  first step, and their ratio (the launcher takes the CLI's path, so it should be ~1);
* ``cancel``: a reconstruction run with a long nvdiffrec step, cancelled while it
  optimises: seconds from Cancel to the step's end and to the job's exit;
* ``report``: ``build_report`` on the knee run (seconds, size of ``report.html``)
  and the sizes of its 3-D pages;
* ``pictures``: ``mesh_png`` (the static 3-D picture of reports) and
  ``write_k3d_snapshot`` on an 82k-face sphere with per-vertex scalars;
* ``gallery``: ``write_index`` over N run folders (copies of the runs above).

    python bench/interactive.py [--parts launcher,cancel,report,pictures,gallery] [--runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _first_step_s(run_dir: Path, t0_unix: float) -> float | None:
    for line in (run_dir / "progress.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["kind"] == "step_start":
            return event["time"] - t0_unix
    return None


def bench_launcher(work: Path) -> dict:
    from workbench.data.samples import knee_sample_options
    from workbench.ui.launcher import BackgroundJob

    options = knee_sample_options(work / "sample")
    options["device"] = "cpu"
    cli_dir = work / "cli-run"
    t0_unix, t0 = time.time(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "workbench.cli", "run", "knee", "--input", options["input"],
                    "--ground-truth", options["ground_truth"], "--device", "cpu", "--out", str(cli_dir)],
                   check=True, capture_output=True)
    cli_s = time.perf_counter() - t0
    cli_first = _first_step_s(cli_dir, t0_unix)
    job_dir = work / "launcher-run"
    t0_unix, t0 = time.time(), time.perf_counter()
    result = BackgroundJob("knee", options, job_dir).start().wait(1800)
    job_s = time.perf_counter() - t0
    assert result is not None and result["status"] == "ok", result
    return {"cli_s": round(cli_s, 2), "launcher_s": round(job_s, 2), "ratio_launcher_over_cli": round(job_s / cli_s, 3),
            "cli_first_step_s": round(cli_first, 2), "launcher_first_step_s": round(_first_step_s(job_dir, t0_unix), 2),
            "run_dirs": [str(cli_dir), str(job_dir)]}


def bench_cancel(work: Path) -> dict:
    from workbench.data.synthetic_scenes import sample_recon
    from workbench.ui.launcher import BackgroundJob

    scene = sample_recon("blob", None, views=16, res=48, out=work / "scene", test_views=4)
    options = {"images": str(scene), "device": "cpu",
               "overrides": {"nvdiffrec.iter": 100000, "nvdiffrec.dmtet_grid": 16, "nvdiffrec.train_res": [48, 48]}}
    job = BackgroundJob("recon", options, work / "cancel-run").start()
    while True:
        steps = {s.name: s for s in job.monitor.steps}
        if "nvdiffrec" in steps and steps["nvdiffrec"].fraction > 0.001:
            break
        if not job.running:
            raise RuntimeError("the run ended before nvdiffrec started")
        time.sleep(0.2)
    t0_unix, t0 = time.time(), time.perf_counter()
    job.cancel()
    result = job.wait(120)
    exit_s = time.perf_counter() - t0
    step_end = next(json.loads(line)["time"] for line in (job.run_dir / "progress.jsonl").read_text().splitlines()
                    if json.loads(line)["kind"] == "step_end" and json.loads(line)["step"] == "nvdiffrec")
    return {"status": result["status"], "cancel_to_step_end_s": round(step_end - t0_unix, 2),
            "cancel_to_job_exit_s": round(exit_s, 2),
            "half_written_outputs": (job.run_dir / "nvdiffrec").exists() or (job.run_dir / ".work").exists()}


def bench_report(run_dir: Path) -> dict:
    from workbench.notebook import build_report

    t0 = time.perf_counter()
    report = build_report(run_dir)
    seconds = time.perf_counter() - t0
    pages = {p.name: round(p.stat().st_size / 1e6, 2) for p in run_dir.glob("*_3d.html")}
    return {"build_report_s": round(seconds, 2), "report_mb": round(report.stat().st_size / 1e6, 2),
            "k3d_pages_mb": pages}


def bench_pictures(work: Path) -> dict:
    import trimesh

    from workbench.ui.viewers import mesh_png, write_k3d_snapshot
    from workbench.viewer3d import MeshLayer, mesh_plot

    sphere = trimesh.creation.icosphere(subdivisions=6, radius=40.0)
    layer = MeshLayer("sphere", sphere.vertices, sphere.faces, scalars=2.0 + sphere.vertices[:, 2] / 20.0)
    t0 = time.perf_counter()
    mesh_png([layer], work / "sphere.png")
    png_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    page = write_k3d_snapshot(mesh_plot([layer]), work / "sphere_3d.html")
    snapshot_s = time.perf_counter() - t0
    return {"faces": int(len(sphere.faces)), "mesh_png_s": round(png_s, 2), "k3d_snapshot_s": round(snapshot_s, 2),
            "k3d_snapshot_mb": round(page.stat().st_size / 1e6, 2)}


def bench_gallery(run_dirs: list[Path], work: Path, n_runs: int) -> dict:
    from workbench.ui.gallery import runs_table, write_index

    root = work / "gallery"
    root.mkdir()
    keep = ("result.json", "thumbnail.png", "report.html")
    for i in range(n_runs):
        source = run_dirs[i % len(run_dirs)]
        target = root / f"{i:03d}-{source.name}"
        target.mkdir()
        for name in keep:
            if (source / name).exists():
                shutil.copy(source / name, target / name)
    t0 = time.perf_counter()
    index = write_index(root)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = runs_table(root)
    table_s = time.perf_counter() - t0
    return {"runs": n_runs, "write_index_s": round(index_s, 2), "index_mb": round(index.stat().st_size / 1e6, 2),
            "runs_table_s": round(table_s, 2), "table_shape": list(table.shape)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="launcher,cancel,report,pictures,gallery")
    parser.add_argument("--runs", type=int, default=50, help="run folders in the gallery part")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    figures: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}
    with tempfile.TemporaryDirectory(prefix="wb-bench-ui-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("WORKBENCH_OUTPUTS", str(work / "outputs"))
        run_dirs: list[Path] = []
        if "launcher" in parts or "report" in parts or "gallery" in parts:
            figures["launcher"] = bench_launcher(work)
            run_dirs = [Path(p) for p in figures["launcher"].pop("run_dirs")]
            print("launcher vs CLI:", figures["launcher"], flush=True)
        if "cancel" in parts:
            figures["cancel"] = bench_cancel(work)
            print("cancel:", figures["cancel"], flush=True)
        if "report" in parts:
            figures["report"] = bench_report(run_dirs[0])
            print("report:", figures["report"], flush=True)
        if "pictures" in parts:
            figures["pictures"] = bench_pictures(work)
            print("pictures:", figures["pictures"], flush=True)
        if "gallery" in parts:
            figures["gallery"] = bench_gallery(run_dirs, work, args.runs)
            print("gallery:", figures["gallery"], flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
