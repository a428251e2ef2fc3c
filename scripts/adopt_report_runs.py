"""Carry the runs of a report rendered before the ledger existed into its ledger (one-off, 2026-12-06).

Before the ledger, a report's finished runs lived in ``work_dir`` (scratch, not committed) and in
the report's state JSON (``docs/report.json``, committed), whose results carry the old cache key:
a hash of the job with the base model's absolute path in it. This script rebuilds each run's job
exactly as ``esft report`` builds it now (same data, profiles and selections, regenerated),
recomputes the *old* key from that job, and adopts the result into the ledger under the new key
only where the old key matches, i.e. where settings, data, expert selection and base weights are
provably the same. Results that do not match are listed and left out (they retrain).

    python scripts/adopt_report_runs.py docs/report.json [--old-model-path /work/main/src/esft/embedded/model]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def legacy_job_id(job: dict, old_model_path: str) -> str:
    """The cache key as `esft report` computed it until 2026-12-06 (paths included)."""
    old = {k: job[k] for k in ("run", "train", "inputs", "eval")}
    old["train"] = {**old["train"], "model": old_model_path}
    return hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("state", help="the report's state JSON (docs/report.json)")
    ap.add_argument("--old-model-path", default=None,
                    help="the base model's path when the runs were trained (default: where it resolves now)")
    args = ap.parse_args(argv)

    from esft.report.config import ReportConfig
    from esft.report.plan import Run
    from esft.report.run import Runner, prepare

    state = json.loads(Path(args.state).read_text())
    cfg = ReportConfig(**state["config"])
    prep = prepare(cfg, progress=True)
    runner = Runner(cfg, prep["model_dir"], prep["data"], prep["selections"], False, prep["model_fingerprint"])
    old_path = args.old_model_path or prep["model_dir"]
    adopted, refused = 0, []
    for r in state["results"]:
        job = runner.job(Run(r["task"], r["variant"], r["lr"], r["seed"]))
        if legacy_job_id(job, old_path) != r["job_id"]:
            refused.append(r["key"])
            continue
        runner.record({**r, "job_id": job["job_id"], "adopted_from": {"state": args.state, "legacy_job_id": r["job_id"]}})
        adopted += 1
    print(f"adopted {adopted} of {len(state['results'])} runs into {runner.ledger}")
    for k in refused:
        print(f"  not adopted (its settings, data or base weights differ from today's): {k}")
    return 0 if not refused else 1


if __name__ == "__main__":
    sys.exit(main())
