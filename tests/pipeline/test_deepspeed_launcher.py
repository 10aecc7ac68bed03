"""`deepspeed --module dist_dpc.train CONFIG [overrides]`: the real DeepSpeed launcher starts two CPU ranks
(gloo) and they train the same model as a single-process `dpc train` of the same config (noise off).

Three forms, all on this one machine:
- `--hostfile H` with `localhost slots=2`. With a hostfile the runner first checks passwordless
  `ssh HOST hostname` and, without --master_addr, asks the first host for its address over ssh
  (deepspeed/launcher/runner.py); neither is possible here, hence `--no_ssh_check --master_addr 127.0.0.1`.
  With a single host it then starts the ranks itself (deepspeed.launcher.launch), no pdsh.
- `--num_gpus 2` without a hostfile, with a user DeepSpeed JSON (ZeRO-2). The CPU accelerator reports one
  device per NUMA node, but --num_gpus sets the slot count directly.
- a two-node hostfile with one launcher per node (`--no_ssh --node_rank K`): what pdsh would start on each
  host of a multi-node run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "CUDA_VISIBLE_DEVICES",
             "WANDB_SERVICE")  # see test_train
# Noise off and dropout off: the only difference between one and two ranks is the order of float32 sums.
CONFIG = [str(ROOT / "configs" / "debug.yaml"), "model.name=tiny-bert", "model.dropout=0", "data.synthetic_size=200",
          "data.max_length=16", "train.batch_size=20", "train.micro_batch_size=8", "train.max_steps=4",
          "privacy.target_epsilon=null", "privacy.noise_multiplier=0",
          "privacy.randomness=insecure_reproducible", "privacy.noise_seed=7",
          # head_init gathers every rank's [CLS] rows back into dataset order: a wrong order changes the head.
          "head_init.centre_pooler=true", "head_init.probe_epochs=1"]
TIMEOUT = 300


def env() -> dict[str, str]:
    # A child must not inherit a torch.distributed environment (in-process tests leave MASTER_PORT set).
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return dict(base, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
                PYTHONPATH=str(ROOT),
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    """Wait under a hard timeout; a hung gloo job is killed with its whole process group."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{proc.args[0]} timed out after {timeout}s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def run(cmd: list[str]) -> str:
    return finish(start(cmd))


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_model(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("single")
    out = run([sys.executable, "-m", "dist_dpc.cli", "train", *CONFIG, f"run.output_dir={out_dir}", "run.name=one"])
    assert "world=1" in out
    return out_dir / "one"


@pytest.mark.slow  # `make test-slow`: the hostfile form is also run two-node below, the one-node form by num_gpus
@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_deepspeed_hostfile_two_ranks_equals_single_process(single_process, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = run([str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--module", "dist_dpc.train",
               *CONFIG, f"run.output_dir={tmp_path}", "run.name=ds"])
    assert "dist_world_size=2" in out  # the launcher started two ranks ...
    assert "--local_rank=0" in out and "--local_rank=1" in out
    assert "world=2" in out and "zero_stage=0" in out  # ... and the engine ran with both
    results = json.loads((tmp_path / "ds" / "results.json").read_text())
    assert results["steps"] == 4
    assert_same_model(weights(tmp_path / "ds"), weights(single_process))


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_deepspeed_num_gpus_zero2_json_equals_single_process(single_process, tmp_path):
    out = run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "dist_dpc.train",
               *CONFIG, f"train.deepspeed_config={ROOT / 'ds_configs' / 'zero2.json'}",
               f"run.output_dir={tmp_path}", "run.name=ds"])
    assert "dist_world_size=2" in out
    assert "world=2" in out and "zero_stage=2" in out
    assert json.loads((tmp_path / "ds" / "results.json").read_text())["steps"] == 4
    assert_same_model(weights(tmp_path / "ds"), weights(single_process))


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_deepspeed_two_node_hostfile_without_ssh_equals_single_process(single_process, tmp_path):
    """The multi-node form: a hostfile naming two nodes, one launcher per node (`--no_ssh --node_rank K`,
    what pdsh would start on each host), here both on this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = [start([str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                    "--master_addr", "127.0.0.1", "--master_port", str(port), "--module", "dist_dpc.train",
                    *CONFIG, f"run.output_dir={tmp_path}", "run.name=ds"]) for node in (0, 1)]
    try:
        outs = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for node, out in enumerate(outs):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in out and "dist_world_size=2" in out
    assert "world=2" in outs[0]  # rank 0 (node 0) prints the run's summary
    assert json.loads((tmp_path / "ds" / "results.json").read_text())["steps"] == 4
    assert_same_model(weights(tmp_path / "ds"), weights(single_process))
