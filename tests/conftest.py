import os
import sys

import pytest

# Tests never reach a hub and never talk to W&B servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process tests initialise torch.distributed, which sets MASTER_PORT, RANK, ...: restore the
    environment after each test so that no later child process (torchrun, sbatch) inherits them.
    A module fixture sets them before this fixture saves the environment; once the process group
    exists the rendezvous address is no longer read, so it is hidden from the test (a child `dpc train` would
    otherwise take the worker's MASTER_PORT, still held by its store, as the user's and fail)."""
    saved = dict(os.environ)
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        for var in RENDEZVOUS_VARS:
            os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(saved)



# The longest scopes (minutes of real ranks, clusters and dpc subprocesses each) go out first: xdist
# hands scopes to the workers in collection order, and a long file picked up last leaves the
# other worker idle at the end (longest-first is the classic remedy for that tail).
LONGEST_FIRST = ("tests/slurm/", "tests/pipeline/test_phases.py", "tests/pipeline/test_zero3_chain.py",
                 "tests/pipeline/test_accounting_by_construction.py",
                 "tests/tasks/test_generate.py", "tests/pipeline/test_defaults.py", "tests/pipeline/test_train.py",
                 "tests/tasks/test_causal_lm.py", "tests/pipeline/test_head_init.py", "tests/tasks/test_synthetic_kd.py",
                 "tests/pipeline/test_audit_run.py", "tests/pipeline/test_tune.py", "tests/engine/test_refusals.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if path.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs without the plugin
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on the two cores through pytest-xdist: a file's tests stay on one worker (its
    module fixtures run once) and every SLURM test shares one worker, because the local cluster is one
    session fixture that several workers must not start and stop under each other. (A custom scope rather
    than xdist_group marks: xdist 3.8 renames node ids in a way pytest 9 no longer sees.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileOrSlurmScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "slurm" if path.startswith("tests/slurm/") else path

    return FileOrSlurmScope(config, log)
