"""python -m moe_lab.lab run --out data/design_space [--work runs/design_space] [--recipes a,b] [--seeds 0,1,2] [--mini]
   python -m moe_lab.lab leak --out data/design_space [--work runs/design_space]
   python -m moe_lab.lab measure --out data/design_space [--work runs/design_space] [--recipes a,b] [--seeds 0,1,2]"""

import argparse
import sys
from pathlib import Path

import torch

from .recipes import FULL, MINI
from .run import SEEDS, Lab, run_lab, write_command
from .summary import lab_causality


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m moe_lab.lab", description=__doc__)
    p.add_argument("cmd", choices=["run", "leak", "measure"],
                   help="run: train and measure every recipe; leak: expert choice's causality leak on the trained models; "
                        "measure: recompute the measures of finished runs from their final checkpoints (no training)")
    p.add_argument("--out", default="data/design_space")
    p.add_argument("--work", default="runs/design_space", help="checkpoints and run directories (git-ignored)")
    p.add_argument("--recipes", default=None, help="comma-separated recipe names (default all)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--mini", action="store_true", help="the miniature lab of notebook 10's fast mode")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    scale = MINI if a.mini else FULL
    if a.cmd == "leak":
        for row in lab_causality(a.work, a.out, scale=scale):
            print(row)
        return
    if a.cmd == "measure":
        Lab(a.out, a.work, scale).measure_again(a.recipes.split(",") if a.recipes else None,
                                               [int(s) for s in a.seeds.split(",")])
        return
    Path(a.out).mkdir(parents=True, exist_ok=True)
    write_command(Path(a.out), argv, scale)
    run_lab(a.out, a.work, scale, a.recipes.split(",") if a.recipes else None, [int(s) for s in a.seeds.split(",")])


if __name__ == "__main__":
    main()
