"""A single-process run picks its own rendezvous port; when another process takes that port first it
picks another instead of failing (seen with two test workers starting runs at once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, socket
    os.environ.pop("MASTER_PORT", None)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    import dist_dpc.engine.distributed as distributed
    pick = distributed._free_port
    picks = iter([taken])
    distributed._free_port = lambda: next(picks, None) or pick()   # the first pick is already taken
    distributed.init_distributed()
    import torch.distributed as dist
    print("OK", dist.get_world_size(), os.environ["MASTER_PORT"] != str(taken))
    dist.destroy_process_group()
""")


def test_a_taken_port_is_replaced_when_the_run_chose_it():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "OK 1 True", out.stdout


def test_a_port_the_user_gave_is_not_replaced():
    script = SCRIPT.replace('os.environ.pop("MASTER_PORT", None)', "").replace(
        "distributed.init_distributed()", 'os.environ["MASTER_PORT"] = str(taken)\ndistributed.init_distributed()')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "EADDRINUSE" in out.stderr, (out.stdout, out.stderr[-2000:])
