"""Train the shipped nnU-Net knee models from scratch on synthetic knee MRI, then measure held-out Dice.

    python bench/train_knee_seg.py --cases 40 --epochs 40 --out models/knee_nnunet

Runs in the project's environment (``make setup``; nnunetv2 2.8.x is a dependency).
nnU-Net's raw/preprocessed/results folders go to ``--work`` (default
``/tmp/nnunet_work``), never into the repository.  Steps (each prints its wall
time): synthetic cases (training seeds ``0..cases-1``, held-out seeds from
100000), planning with the tiny planner and preprocessing, training ``3d_lowres``,
``3d_fullres`` and ``3d_cascade_fullres`` (fold ``all``, short trainer), export of
stripped checkpoints into ``--out``, held-out Dice of ``3d_fullres`` and of the
cascade, and ``metadata.json``/``results.json`` in ``--out``.  Training is not
seeded: a rerun gives a similar, not identical, model.

``--budget-fullres``/``--budget-lowres``/``--budget-cascade`` (seconds) cap the
training loops: the trainer lowers the number of epochs to what fits (the
shipped models were trained on 2 CPU cores under such budgets; see
models/knee_nnunet/model_card.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40, help="training cases (seeds 0..cases-1)")
    parser.add_argument("--held-out", type=int, default=10, help="held-out cases (seeds from 100000)")
    parser.add_argument("--epochs", type=int, default=40, help="maximum epochs per configuration")
    parser.add_argument("--iterations", type=int, default=25, help="iterations per epoch")
    parser.add_argument("--budget-fullres", type=float, default=None, help="training-loop budget (s), 3d_fullres")
    parser.add_argument("--budget-lowres", type=float, default=None, help="training-loop budget (s), 3d_lowres")
    parser.add_argument("--budget-cascade", type=float, default=None, help="training-loop budget (s), cascade")
    parser.add_argument("--work", default="/tmp/nnunet_work", help="nnU-Net raw/preprocessed/results root")
    parser.add_argument("--out", default="models/knee_nnunet", help="shipped model folder")
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation/preprocessing")
    parser.add_argument("--skip-data", action="store_true", help="reuse the raw dataset and preprocessing in --work")
    parser.add_argument("--skip-train", action="store_true", help="reuse the trained results in --work")
    parser.add_argument("--parallel", action="store_true",
                        help="train 3d_fullres beside the lowres -> cascade chain (one torch thread each)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per training run")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring in the evaluation")
    args = parser.parse_args(argv)

    from workbench.knee import nnunet_training as T

    work, out = Path(args.work), Path(args.out)
    T.set_nnunet_env(work, n_proc=args.workers)
    times: dict[str, float] = {}

    if not args.skip_data:
        t0 = time.perf_counter()
        record = T.build_raw_dataset(work / "nnUNet_raw", args.cases, n_held_out=args.held_out,
                                     workers=args.workers)
        times["data"] = round(time.perf_counter() - t0, 1)
        print(f"data: {args.cases}+{args.held_out} cases in {times['data']} s ({record['folder']})", flush=True)
        t0 = time.perf_counter()
        plans = T.plan_and_preprocess(n_proc=args.workers)
        times["plan_preprocess"] = round(time.perf_counter() - t0, 1)
        print(f"plan + preprocess: {times['plan_preprocess']} s; patch sizes "
              + ", ".join(f"{c}: {plans['configurations'][c].get('patch_size')}" for c in ("3d_fullres", "3d_lowres")),
              flush=True)

    budgets = {"3d_lowres": args.budget_lowres, "3d_fullres": args.budget_fullres,
               "3d_cascade_fullres": args.budget_cascade}
    def run(configurations: tuple[str, ...], threads: int | None) -> None:
        for configuration in configurations:
            r = T.train(configuration, work, epochs=args.epochs, iterations=args.iterations, n_proc=1,
                        time_budget_s=budgets[configuration], threads=threads,
                        log_file=work / f"train_{configuration}.log")
            times[f"train_{configuration}"] = r["seconds"]
            print(f"train {configuration}: {r['seconds']} s", flush=True)

    if not args.skip_train and args.parallel:
        # 3d_fullres beside the 3d_lowres -> 3d_cascade_fullres chain (as the shipped models were trained)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(run, ("3d_fullres",), args.threads or 1),
                    pool.submit(run, ("3d_lowres", "3d_cascade_fullres"), args.threads or 1)]
            for job in jobs:
                job.result()
    elif not args.skip_train:
        run(("3d_lowres", "3d_fullres", "3d_cascade_fullres"), args.threads)

    command = "python bench/train_knee_seg.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = T.finalize(work, out, cases=args.cases, held_out=args.held_out, command=command, times=times,
                        use_mirroring=args.mirroring)
    for c, info in result["exported"].items():
        print(f"export {c}: {info['epochs']} epochs, {info['parameters']} parameters, {info['bytes']} bytes",
              flush=True)
    for r in result["evaluation"]:
        print(f"eval {r['model']}: {r['n_cases']} cases, {r['seconds_per_case']} s/case", flush=True)
    print(T.dice_table(result["evaluation"]), flush=True)
    times = result["times_s"]
    print(json.dumps(times, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
