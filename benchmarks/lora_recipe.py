"""What a LoRA expert's recipe needs to come near the full fine-tune (issue 17): train the LoRA
expert of one task and seed with recipe overrides (e.g. more epochs) and record its validation
metrics beside the full fine-tune's in ``results/experts.json``.

    python benchmarks/lora_recipe.py emotion --seed 0 --set epochs=3

Appends one trial to ``benchmarks/results/lora_recipe.json`` (atomic write). The expert lands in
the cache under its own key (the overrides are part of it), never in place of the published one.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from lib import cache, paths, train

OUT = paths.ROOT / "benchmarks" / "results" / "lora_recipe.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="recipe override key=value (JSON value)")
    args = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    start, cpu = time.perf_counter(), time.process_time()
    expert = train.fit_expert(args.task, seed=args.seed, lora=True, smoke=False, **overrides)
    full = next(
        e
        for e in paths.read_json(paths.results_dir(False) / "experts.json")["experts"]
        if e["task"] == args.task and e["seed"] == args.seed and e["variant"] == "pretrained"
    )
    trial = {
        "task": args.task,
        "seed": args.seed,
        "overrides": overrides,
        "lr": expert.config["recipe"]["lr"],
        "lora": cache.lora_spec(True),
        "key": expert.key,
        "metrics": expert.metrics,
        "full_fine_tune": full["metrics"],
        "runtime": expert.runtime,
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "load_average": os.getloadavg()[0],
    }
    trials = paths.read_json(OUT)["trials"] if OUT.exists() else []
    paths.write_json(OUT, {"benchmark": "lora_recipe", "trials": [*trials, trial]})
    print(json.dumps({k: trial[k] for k in ("task", "overrides", "metrics", "full_fine_tune")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
