"""Gaussian noise for the summed clipped gradient: N(0, sigma^2 C^2) once per coordinate.

Each tensor's draws come from Philox generators keyed by (phase key, labels, tensor index, chunk),
128-bit (dist_dpc.privacy.randomness): there is no generator state to checkpoint, and a label tuple
names its draws exactly. The DP engine's labels are (step, stream, call): ``stream`` separates ranks
that own disjoint partitions (ZeRO >= 1: independent noise per partition); ranks that each hold a
full replica (ZeRO 0) use the same stream so they apply identical noise.

Where the draws are made (privacy.noise_sampler): on the host (numpy Philox, 128-bit keys; the draws
do not depend on the hardware), or on the CUDA device that holds the gradients (torch's Philox, the
XOR of three independently keyed streams; randomness.add_gaussian_cuda_), which ``choose_noise_sampler``
decides once per engine, all ranks together.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import torch

from dist_dpc.privacy.randomness import SecretKey, add_gaussian_, cuda_fingerprint


def add_gaussian_noise_(tensors: list[torch.Tensor], std: float, key: SecretKey, *labels: int | str,
                        on_device: bool = False) -> None:
    """In place: t += N(0, std^2), independently per coordinate and per tensor; the draws are a
    function of (key, labels, tensor index) alone (and, on the device, of the device's fingerprint)."""
    if std == 0:
        return
    for index, t in enumerate(tensors):
        add_gaussian_(t, std, key, "gaussian-noise", *labels, index, on_device=on_device)


class NoiseSamplerError(ValueError):
    """privacy.noise_sampler asks for something this run's tensors or ranks cannot do."""


def choose_noise_sampler(requested: str, tensors: list[torch.Tensor], *, replicated: bool, world_size: int,
                         key: SecretKey) -> bool:
    """Once per engine, on every rank (collective unless ``requested`` is host): True to draw on the device.

    auto: on the device when, on every rank, the optimizer partition is on a CUDA device and the device
    sampler passes ``check_device_sampler``, and, for replicas that must apply identical noise (ZeRO 0,
    several ranks), every rank's self-test draws are bit-identical; else the host, on every rank.
    device: the same conditions, refused when one fails. host: always the host. The ranks decide
    together, so a failure on one rank is the same answer (or the same error) on all of them, never
    one rank in a collective the others skipped."""
    if requested == "host":
        return False
    local = _device_status(tensors, key)
    statuses = [local]
    if world_size > 1:
        statuses = [None] * world_size
        torch.distributed.all_gather_object(statuses, local)
    return decide_noise_sampler(requested, statuses, replicated=replicated)


def decide_noise_sampler(requested: str, statuses: list[dict], *, replicated: bool) -> bool:
    """choose_noise_sampler's decision from every rank's status (the same list on every rank, so the
    same answer or the same error everywhere)."""
    problems = [f"rank {rank}: {status['problem']}" for rank, status in enumerate(statuses) if status["problem"]]
    if not problems and replicated and len({status["digest"] for status in statuses}) > 1:
        fingerprints = [status["fingerprint"] for status in statuses]
        problems.append("ZeRO 0 replicas must apply identical noise, and torch's CUDA generator draws differently on "
                        f"these ranks' devices ({replica_fingerprints_differ(fingerprints) or 'same fingerprint'})")
    if not problems:
        return True
    if requested == "device":
        raise NoiseSamplerError(f"privacy.noise_sampler=device: {'; '.join(problems)}. Set privacy.noise_sampler=auto "
                                "(the host draws the noise then) or host")
    if any(status["on_cuda"] for status in statuses):
        warnings.warn(f"the noise is drawn on the host (privacy.noise_sampler=auto): {'; '.join(problems)}",
                      stacklevel=3)
    return False


def _device_status(tensors: list[torch.Tensor], key: SecretKey) -> dict:
    """This rank's part of choose_noise_sampler's decision (picklable, nothing secret: the digest is a
    hash of draws under a label no step uses)."""
    devices = sorted({str(t.device) for t in tensors})
    if not tensors or not all(t.is_cuda for t in tensors):
        return {"on_cuda": False, "fingerprint": None, "digest": None,
                "problem": f"the optimizer partition is on {', '.join(devices) or 'no device (empty)'} (a CPU run or "
                           "ZeRO-Offload of the optimizer), not on a GPU"}
    if len(devices) > 1:
        return {"on_cuda": True, "fingerprint": None, "digest": None,
                "problem": f"the optimizer partition spans several devices ({', '.join(devices)})"}
    device = tensors[0].device
    try:  # any failure (the self-test, out of memory, a kernel image missing) is this rank's status: the
        # other ranks are about to wait in all_gather_object for it, so raising here would hang them
        fingerprint = cuda_fingerprint(device)
        digest = check_device_sampler(device, key)
    except Exception as err:  # noqa: BLE001 -- reported to every rank and decided together
        return {"on_cuda": True, "fingerprint": None, "digest": None, "problem": f"{type(err).__name__}: {err}"}
    return {"on_cuda": True, "fingerprint": fingerprint, "digest": digest, "problem": ""}


def replica_fingerprints_differ(fingerprints: list[str]) -> str:
    """'' when all ranks' CUDA fingerprints agree, else which ranks differ from rank 0 and how."""
    return "; ".join(f"rank {rank}: {fp} vs rank 0: {fingerprints[0]}"
                     for rank, fp in enumerate(fingerprints) if fp != fingerprints[0])


def check_device_sampler(device: torch.device, key: SecretKey, count: int = 1 << 22) -> str:
    """Before a device sampler noises anything: 4 M draws under a label no step uses must look like
    N(0, 1) -- mean, standard deviation and the mass beyond 3 within about 8 standard errors (a
    sampler that returned zeros, half the variance or a uniform would fail by hundreds). A guard
    against a broken kernel or generator, not a proof of normality. Returns a hash of the draws
    (replicas compare it: identical noise needs identical draws)."""
    values = torch.zeros(count, dtype=torch.float32, device=device)
    add_gaussian_(values, 1.0, key, "device-sampler-self-test", on_device=True)
    digest = hashlib.sha256(values.cpu().numpy().tobytes()).hexdigest()
    values = values.double()
    mean, std = float(values.mean()), float(values.std())
    tail = float((values.abs() > 3).double().mean())
    expected_tail = math.erfc(3 / math.sqrt(2))  # 0.0027
    tail_se = math.sqrt(expected_tail * (1 - expected_tail) / count)
    problems = []
    if abs(mean) > 8 / math.sqrt(count):
        problems.append(f"mean {mean:.5f}")
    if abs(std - 1) > 8 / math.sqrt(2 * count):
        problems.append(f"standard deviation {std:.5f}")
    if abs(tail - expected_tail) > 8 * tail_se:
        problems.append(f"mass beyond 3: {tail:.5f} against {expected_tail:.5f}")
    if problems:
        raise NoiseSamplerError(f"the CUDA noise sampler on {device} failed its self-test ({', '.join(problems)} for "
                                f"{count} draws of N(0, 1)): set privacy.noise_sampler=host")
    return digest
