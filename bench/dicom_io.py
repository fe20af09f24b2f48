"""Benchmark: read the real MESE knee series with the workbench and with SimpleITK, and check they agree.

Both sides produce the same 8 echo volumes from the same 192 files:

* workbench: ``workbench.io.dicom.read_dicom(folder)`` (walk, headers, grouping
  by series and echo, sorting, checks, pixels, affine);
* SimpleITK: ``ImageSeriesReader.GetGDCMSeriesFileNames`` (GDCM's sorted file
  list), a header-only ``ImageFileReader.ReadImageInformation`` per file to group
  by echo time, then one ``ImageSeriesReader`` per echo over that echo's files.

Each side runs once untimed (warm file cache), then ``--repeats`` times
alternately; the medians, their ratio and the largest voxel and affine
differences are printed.  Exits 0 with a message when the sample data is absent.

    python bench/dicom_io.py [--repeats 5] [--folder PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_workbench(folder: Path):
    from workbench.io.dicom import read_dicom

    volume = read_dicom(folder)
    return volume.echoes if volume.echoes is not None else volume.data[..., None], volume.affine, volume.echo_times_ms


def read_simpleitk(folder: Path, timings: dict | None = None):
    import SimpleITK as sitk

    start = time.perf_counter()
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    header = sitk.ImageFileReader()
    groups: dict[float, list[str]] = {}
    for name in names:
        header.SetFileName(name)
        header.ReadImageInformation()
        groups.setdefault(round(float(header.GetMetaData("0018|0081")), 3), []).append(name)
    grouped = time.perf_counter()
    volumes, affine = [], None
    reader = sitk.ImageSeriesReader()
    for te in sorted(groups):
        reader.SetFileNames(groups[te])
        image = reader.Execute()
        volumes.append(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).copy())  # [k,j,i] -> [i,j,k]
        if affine is None:
            lps = np.eye(4)
            lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
            lps[:3, 3] = image.GetOrigin()
            affine = LPS_TO_RAS @ lps
    stack = np.stack(volumes, axis=-1)
    if timings is not None:
        timings.setdefault("group", []).append(grouped - start)
        timings.setdefault("read", []).append(time.perf_counter() - grouped)
    return stack, affine, sorted(groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each reader (default 5)")
    parser.add_argument("--folder", type=Path, default=None, help="DICOM folder (default: the cached MESE series)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    folder = args.folder
    if folder is None:
        from workbench.data.samples import mese_dir
        from workbench.errors import WorkbenchError

        try:
            folder = mese_dir(fetch=False)
        except WorkbenchError as exc:
            print(f"skipped: {exc.message} ({exc.hint})")
            return 0
    if not Path(folder).is_dir():
        print(f"skipped: {folder} is not a folder")
        return 0
    try:
        import SimpleITK as sitk
    except ImportError:
        print("skipped: SimpleITK is not installed (pip install SimpleITK)")
        return 0
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # GDCM warns about the rounding of GE's positions
    import pydicom

    n_files = sum(1 for p in Path(folder).rglob("*") if p.is_file())
    print(f"DICOM I/O benchmark: {folder}")
    print(f"  {n_files} files; python {platform.python_version()}, pydicom {pydicom.__version__}, "
          f"SimpleITK {sitk.Version.VersionString()}, numpy {np.__version__}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs")

    wb, wb_affine, wb_tes = read_workbench(folder)  # warm-up (file cache, imports)
    it, it_affine, it_tes = read_simpleitk(folder)
    t_wb, t_it, parts = [], [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        wb, wb_affine, wb_tes = read_workbench(folder)
        t_wb.append(time.perf_counter() - start)
        start = time.perf_counter()
        it, it_affine, it_tes = read_simpleitk(folder, parts)
        t_it.append(time.perf_counter() - start)

    median_wb, median_it = statistics.median(t_wb), statistics.median(t_it)
    tes = [round(t, 3) for t in wb_tes]
    print(f"  volumes: {wb.shape[-1]} echoes of {list(wb.shape[:3])} {wb.dtype}; TE (ms) {tes}")
    print(f"  repeats: {args.repeats} (after one untimed warm-up run each)")
    print(f"  workbench read_dicom          median {median_wb:.4f} s  (min {min(t_wb):.4f}, max {max(t_wb):.4f})")
    print(f"  SimpleITK group + 8 reads     median {median_it:.4f} s  (min {min(t_it):.4f}, max {max(t_it):.4f})")
    print(f"    of which echo grouping      median {statistics.median(parts['group']):.4f} s, "
          f"series reads median {statistics.median(parts['read']):.4f} s")
    print(f"  ratio workbench / SimpleITK   {median_wb / median_it:.2f}x")

    same_shape = wb.shape == it.shape
    voxel_diff = float(np.max(np.abs(wb.astype(np.float64) - it.astype(np.float64)))) if same_shape else float("nan")
    affine_diff = float(np.max(np.abs(wb_affine - it_affine)))
    tes_match = np.allclose(wb_tes, it_tes, atol=1e-3)
    print(f"  max abs voxel diff  {voxel_diff:g}  (shapes {list(wb.shape)} vs {list(it.shape)}, dtypes {wb.dtype} vs "
          f"{it.dtype})")
    print(f"  max abs affine diff {affine_diff:.3g} mm  (RAS+, SimpleITK converted from LPS)")
    identical = same_shape and voxel_diff == 0.0 and affine_diff < 1e-4 and tes_match
    print(f"  identical voxels and affine: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
