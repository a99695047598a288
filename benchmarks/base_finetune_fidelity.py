"""Generation fidelity after the demo's fine-tuning, for any base model folder.

Runs only the demo's data, fine-tuning and generation stages (:mod:`jaxattrib.runs.demo`:
``build_data``, ``finetune_stage``, ``generate_stage``; the demo's config, overridable with
``--set key=value``) on ``--model`` in ``--run-dir`` (resumable: the stages cache their outputs),
and classifies the generations of the held-out concepts with the base model's own synthetic spec
(:func:`jaxattrib.data.synthetic.classify_concepts`, which never saw them). No attribution.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu nice -n 19 python benchmarks/base_finetune_fidelity.py \
        --model FOLDER --run-dir DIR [--set finetune.steps=400 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> dict:
    from jaxattrib.train.base_model import spec_from_info
    from jaxattrib.configs.demo import get_config
    from jaxattrib.data.synthetic import classify_concepts
    from jaxattrib.runs import demo

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--set", action="append", default=[], help="demo config key=value")
    a = p.parse_args(argv)
    config = get_config()
    config.base_model = str(Path(a.model).resolve())
    for kv in a.set:
        k, v = kv.split("=", 1)
        node = config
        *path, last = k.split(".")
        for part in path:
            node = node[part]
        node[last] = type(node[last])(v) if not isinstance(node[last], tuple) else v
    run_dir, pipe, info = demo.open_base_run(a.run_dir, config)
    t0 = time.time()
    data = demo.build_data(run_dir, config, info)
    unet_params, record = demo.finetune_stage(run_dir, config, pipe, data["train"], False)
    record.close()
    t_ft = time.time() - t0
    held = [dict(h) for h in info["held_out"]]
    spec = spec_from_info(info)
    queries = demo.generate_stage(run_dir, config, pipe, unet_params, held,
                                  backgrounds=spec.backgrounds)
    pred = classify_concepts(queries["images"], spec)
    want_s = np.array([spec.shapes.index(held[c]["shape"]) for c in queries["concept"]])
    want_c = np.array([spec.colors.index(held[c]["color"]) for c in queries["concept"]])
    res = {"model": config.base_model, "finetune_steps": int(config.finetune.steps),
           "queries": int(len(want_s)),
           "shape": float(np.mean(pred["shape"] == want_s)),
           "color": float(np.mean(pred["color"] == want_c)),
           "per_concept": {f"{h['color']} {h['shape']}": {
               "shape": float(np.mean((pred["shape"] == want_s)[queries["concept"] == i])),
               "color": float(np.mean((pred["color"] == want_c)[queries["concept"] == i]))}
               for i, h in enumerate(held)},
           "demo_metric": demo._generation_accuracy(queries, held, spec),
           "seconds_finetune_incl_compile": round(t_ft, 1),
           "env": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "machine": f"{platform.node()} {os.cpu_count()} cpus",
                   "load": os.getloadavg()}}
    text = json.dumps(res, indent=2)
    print(text)
    (Path(run_dir) / "fidelity.json").write_text(text)
    return res


if __name__ == "__main__":
    main()
