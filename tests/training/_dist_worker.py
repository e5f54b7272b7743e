"""One training process of a multi-process test, started with RANK, WORLD_SIZE, ... set.

``python _dist_worker.py fit SPEC DATA OUT CONFIG_JSON`` or ``... resume RUN`` or
``... die``: ``fit`` trains (OUT ``-`` lets process 0 pick ``runs/NNN`` in the working
directory), ``resume`` continues a run, ``die`` joins the group and exits at once.
"""

from __future__ import annotations

import json
import sys

from cnnkit.data import load
from cnnkit.models import ArchitectureSpec
from cnnkit.training import TrainConfig, fit, resume
from cnnkit.training.distributed import process_group

mode = sys.argv[1]
if mode == "fit":
    spec_path, data_path, out, options = sys.argv[2:6]
    spec = ArchitectureSpec.load(spec_path)
    data = load(data_path, (spec.input.height, spec.input.width))
    fit(spec, data, TrainConfig(**json.loads(options)), out=None if out == "-" else out)
elif mode == "resume":
    resume(sys.argv[2])
elif mode == "die":
    with process_group("cpu") as world:
        sys.exit(3 if world.rank == 1 else 0)
