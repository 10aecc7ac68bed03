"""`dpc submit`: every phase of a run as a submitit job (SLURM, local or in-process), chained with afterok.

The job only sets up the torch.distributed environment from SLURM and calls the phase; the run
directory holds everything needed to resume, so a requeued job simply starts again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dist_dpc.utils.atomic import private_dir
from dist_dpc.utils.config_loader import build, to_dict



class PhaseJob:
    """Picklable job body; submitit calls ``checkpoint`` on preemption/timeout and requeues it."""

    def __init__(self, config: dict, phase: str, shard: int | None = None):
        self.config, self.phase, self.shard = config, phase, shard

    def __call__(self) -> dict:
        import submitit

        from dist_dpc.pipeline.config import Config

        env = submitit.JobEnvironment()
        # The job inherits the submitting shell's environment (sbatch --export=ALL): a RANK or
        # MASTER_PORT left there by an earlier process means nothing here and must not win over
        # what SLURM says about this job.
        os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                           "LOCAL_RANK": str(env.local_rank)})
        if env.num_tasks > 1 or "SLURM_JOB_ID" in os.environ:
            from dist_dpc.engine.distributed import env_from_slurm

            job_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
            job_env.update(SLURM_PROCID=str(env.global_rank), SLURM_NTASKS=str(env.num_tasks),
                           SLURM_LOCALID=str(env.local_rank))
            if "SLURM_JOB_NODELIST" not in job_env and "SLURM_NODELIST" not in job_env:
                job_env["SLURM_JOB_NODELIST"] = ",".join(env.hostnames)
            os.environ.update(env_from_slurm(job_env))
        else:
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        os.environ.setdefault("WANDB_MODE", "offline")
        from dist_dpc.pipeline.phases import run_phase
        if self.shard is not None:  # one task of a `dpc generate` array
            os.environ["DPC_GENERATE_SHARD"] = str(self.shard)

        cfg = build(Config, self.config)
        # A local/debug job runs several phases in order (no scheduler to chain them).
        return {phase: run_phase(cfg, phase) for phase in self.phase.split("+")}

    def checkpoint(self, *args, **kwargs):
        import submitit

        # Resuming needs nothing from memory: the phase restarts from its last complete checkpoint
        # in the run directory (accountant, sampler position and noise streams included).
        return submitit.helpers.DelayedSubmission(PhaseJob(self.config, self.phase, self.shard))


def executor_for(cfg, folder: Path, phase: str, after: str | None = None):
    import submitit

    c = cfg.cluster
    kwargs = {"slurm_max_num_timeout": c.max_requeues} if c.executor == "slurm" else {}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=c.executor, **kwargs)
    params = {"name": f"dpc-{cfg.run.name}-{phase}", "timeout_min": c.time_min, "nodes": c.nodes,
              "tasks_per_node": c.tasks_per_node, "cpus_per_task": c.cpus_per_task}
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.mem_gb is not None:
        params["mem_gb"] = c.mem_gb
    if c.executor == "slurm":
        extra = dict(c.sbatch_extra)
        for key in ("account", "qos", "constraint"):
            if getattr(c, key):
                extra[key] = getattr(c, key)
        if after is not None:
            # A failed (or cancelled) phase makes its dependants unrunnable: SLURM removes them
            # instead of leaving them pending forever.
            extra.update({"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
        params.update({"slurm_partition": c.partition, "slurm_additional_parameters": extra})
        params = {k: v for k, v in params.items() if v is not None}
    executor.update_parameters(**params)
    return executor


def submit(cfg, phases: tuple[str, ...] | None = None) -> list[dict]:
    """Submit ``phases`` (default: pipeline.phases) in order, each depending (afterok) on the previous
    one; records job ids. Training phases already completed in the run tree are not submitted again,
    so re-submitting a run resumes it after its last completed phase."""
    from dist_dpc.pipeline.phases import COMPLETED_BY_RESULTS, check_phases

    phases = tuple(cfg.pipeline.phases) if phases is None else tuple(phases)
    check_phases(cfg, phases)
    run_dir = private_dir(Path(cfg.run.output_dir) / cfg.run.name)  # 0700: see dist_dpc.utils.atomic
    folder = run_dir / "jobs"
    records, previous = [], None
    def done(p: str) -> bool:
        return (run_dir / "results.json").is_file() if p == "train" else \
            p in COMPLETED_BY_RESULTS and (run_dir / p / "results.json").is_file()

    todo = [p for p in phases if not done(p)]
    for phase in phases:
        if phase not in todo:
            records.append({"phase": phase, "job_id": "-", "executor": "done", "logs": str(folder)})
    if cfg.cluster.executor != "slurm" and todo:
        # Without a scheduler there are no afterok dependencies: one job runs the phases in order.
        todo = ["+".join(todo)]
    for phase in todo:
        after = previous.job_id.split("_")[0] if previous is not None else None  # an array: all its tasks
        executor = executor_for(cfg, folder, phase, after=after)
        if phase == "generate" and cfg.cluster.executor == "slurm" and cfg.generate.shards > 1:
            # One array task per shard; each finishes its batches, the last one merges them.
            with executor.batch():
                jobs = [executor.submit(PhaseJob(to_dict(cfg), phase, shard)) for shard in range(cfg.generate.shards)]
            job = jobs[0]
            records += [{"phase": f"{phase}[{j}]", "job_id": str(t.job_id), "executor": cfg.cluster.executor,
                         "logs": str(folder)} for j, t in enumerate(jobs)]
        else:
            job = executor.submit(PhaseJob(to_dict(cfg), phase))
            records.append({"phase": phase, "job_id": str(job.job_id), "executor": cfg.cluster.executor,
                            "logs": str(folder)})
        previous = job
        if cfg.cluster.executor == "debug":
            job.result()  # submitit's debug jobs run in this process, and only when asked for
    (run_dir / "jobs.json").write_text(json.dumps(records, indent=2))
    return records


def status(run_dir: str | Path) -> list[dict]:
    """Each phase's job state, from the scheduler (sacct through submitit) and the run directory."""
    import submitit

    run_dir = Path(run_dir)
    path = run_dir / "jobs.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no jobs.json: was it submitted with `dpc submit`?")
    out = []
    for record in json.loads(path.read_text()):
        state = "UNKNOWN"
        last = record["phase"].split("+")[-1].split("[")[0]  # "generate[3]": a task of the generate array
        done = {"train": run_dir / "results.json", "generate": run_dir / "generate" / "summary.json"}.get(
            last, run_dir / last / "results.json")
        if record["executor"] == "done":
            state = "COMPLETED"
        elif record["executor"] == "slurm":
            state = submitit.SlurmJob(folder=record["logs"], job_id=record["job_id"]).state
        elif done.is_file():
            state = "COMPLETED"
        elif record["executor"] == "local":
            state = local_state(record)
        out.append({**record, "state": state, "finished": done.is_file()})
    return out


def local_state(record: dict) -> str:
    """State of a submitit local job seen from another process (submitit knows it only in the one
    that submitted): the job's result file says COMPLETED or FAILED; without one, the job is RUNNING
    while its process (the job id is its pid) is alive, and FAILED once it died without a result."""
    import submitit
    from submitit.core.utils import pickle_load

    job = submitit.local.local.LocalJob(folder=record["logs"], job_id=record["job_id"])
    if job.paths.result_pickle.exists():
        outcome, _ = pickle_load(job.paths.result_pickle)  # ("success" | "error", value or traceback)
        return "COMPLETED" if outcome == "success" else "FAILED"
    try:
        os.kill(int(record["job_id"]), 0)
    except ProcessLookupError:
        return "FAILED"
    except PermissionError:  # alive, owned by someone else
        return "RUNNING"
    except ValueError:
        return "UNKNOWN"
    stat = Path(f"/proc/{record['job_id']}/stat")
    if stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
        return "FAILED"  # exited, not yet reaped (no init reaping orphans in some containers)
    return "RUNNING"
