"""The secret behind every random draw that protects the private data: noise and Poisson batches.

Why not an integer seed and ``torch.Generator``: torch's CPU generator (mt19937) keeps only the low
32 bits of a seed, so two seeds equal in their low 32 bits give the same draws, and a single noisy
release (e.g. head_init's DP mean) could be de-noised by trying all 2^32 seeds. Here every draw comes
from numpy's Philox keyed by 128 bits derived from a 256-bit ``SecretKey``:

    SecretKey --derive(labels)--> SecretKey --generator(labels)--> np.random.Generator(Philox(128-bit key))

Derivation is keyed BLAKE2b over length-prefixed labels, so distinct label tuples give unrelated keys
and no derived key reveals its parent. The key object never prints, pickles or converts to an int:
it cannot end up in a checkpoint, config.yaml, W&B or a log by accident. Ranks receive it in memory
(``broadcast_key``). Only ``privacy.randomness=insecure_reproducible`` derives it from a seed.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable

import numpy as np
import torch

KEY_BYTES = 32  # 256-bit secret
_PERSON = b"dist-dpc-key-v1"  # BLAKE2b personalisation: these derivations mean nothing elsewhere
CHUNK = 1 << 22  # noise is drawn this many float32 values at a time (16 MiB of host memory)


def _encode(labels: tuple) -> bytes:
    """Unambiguous bytes of a label tuple: each label typed and length-prefixed, so ("a", 1) != ("a1",)."""
    out = bytearray()
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise TypeError(f"key labels are str or int, got {type(label).__name__} {label!r}")
        kind, body = (b"s", label.encode()) if isinstance(label, str) else (b"i", str(label).encode())
        out += kind + len(body).to_bytes(4, "little") + body
    return bytes(out)


class SecretKey:
    """A 256-bit secret with derivations; never shown, pickled or turned into an int."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"a SecretKey holds exactly {KEY_BYTES} bytes")
        self._key = bytes(key)

    @classmethod
    def generate(cls) -> "SecretKey":
        """Fresh OS entropy: what every private run uses unless it asked to be reproducible."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def from_seed(cls, seed: int) -> "SecretKey":
        """INSECURE: a key anyone who knows ``seed`` can rebuild (reproducible runs and tests only)."""
        return cls(hashlib.blake2b(_encode(("insecure-seed", int(seed))), digest_size=KEY_BYTES,
                                   person=_PERSON).digest())

    def _digest(self, labels: tuple, size: int) -> bytes:
        return hashlib.blake2b(_encode(labels), key=self._key, digest_size=size, person=_PERSON).digest()

    def derive(self, *labels: int | str) -> "SecretKey":
        """An independent key for one use (a phase, a prune round, the DP mean, the probe)."""
        return SecretKey(self._digest(labels, KEY_BYTES))

    def generator(self, *labels: int | str) -> np.random.Generator:
        """A Philox generator keyed by 128 bits derived from (key, labels)."""
        return np.random.Generator(np.random.Philox(key=int.from_bytes(self._digest(labels, 16), "little")))

    def uint64(self, *labels: int | str) -> int:
        """64 key bits for one CUDA Philox generator (dist_dpc.privacy.randomness.add_gaussian_, on_device)."""
        return int.from_bytes(self._digest(labels, 8), "little")

    def seed64(self, *labels: int | str) -> int:
        """A 63-bit seed for randomness that protects nothing (dropout masks); reveals nothing of the key."""
        return int.from_bytes(self._digest(labels, 8), "little") & (2**63 - 1)

    def fingerprint(self) -> str:
        """A short one-way tag (for tests comparing keys across ranks); not the key."""
        return self._digest(("fingerprint",), 8).hex()

    def __repr__(self) -> str:
        return "SecretKey(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a SecretKey is never serialised (it would land in a checkpoint or log); "
                        "derive what you need to store instead")

    def __copy__(self) -> "SecretKey":
        return self

    def __deepcopy__(self, memo) -> "SecretKey":
        return self


def broadcast_key(key: SecretKey | None, world_size: int) -> SecretKey:
    """Rank 0's key on every rank, sent in memory (never through a file). ``key`` is ignored off rank 0."""
    if world_size <= 1 or not torch.distributed.is_initialized():
        assert key is not None, "rank 0 must hold the key"
        return key
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = torch.zeros(KEY_BYTES, dtype=torch.uint8, device=device)
    if torch.distributed.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(key._key), dtype=torch.uint8))
    torch.distributed.broadcast(buf, src=0)
    received = SecretKey(bytes(buf.cpu().tolist()))
    buf.zero_()
    return received


def add_gaussian_(tensor: torch.Tensor, std: float, key: "SecretKey", *labels: int | str,
                  on_device: bool = False) -> None:
    """In place: tensor += N(0, std^2) per coordinate, drawn in float32 on the host and moved to the
    tensor's device (the draws do not depend on the device, so replicas stay identical); with
    ``on_device``, drawn on the tensor's CUDA device instead (add_gaussian_cuda_).

    The tensor is cut into chunks of CHUNK values, each with its own generator keyed by (labels, chunk
    index), and the chunks are drawn by a pool of threads (numpy releases the GIL while it fills an
    array): drawing is the host's work, and it scales with its cores. The draws depend only on
    (key, labels), never on the number of threads."""
    if on_device:
        add_gaussian_cuda_(tensor, std, key, *labels)
        return

    def draw(target: torch.Tensor, chunk: int) -> None:
        values = key.generator(*labels, "chunk", chunk).standard_normal(target.numel(), dtype=np.float32)
        target.add_(torch.from_numpy(values).to(target.device).mul_(std).to(target.dtype))

    _add_by_chunks_(tensor, CHUNK, draw, parallel=True)


def _add_by_chunks_(tensor: torch.Tensor, chunk_size: int, add_chunk: Callable[[torch.Tensor, int], None],
                    parallel: bool = False) -> None:
    """In place: ``add_chunk(view, chunk)`` adds to each ``chunk_size`` slice of the tensor's flat view
    (a non-contiguous tensor goes through a flat temporary, added back at the end). With ``parallel``
    the chunks are handed to the noise threads; what each chunk gets depends only on its index."""
    contiguous = tensor.is_contiguous()
    target = tensor.view(-1) if contiguous else torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    numel = target.numel()

    def one(chunk: int) -> None:
        start = chunk * chunk_size
        add_chunk(target[start:start + min(chunk_size, numel - start)], chunk)

    chunks = range((numel + chunk_size - 1) // chunk_size)
    if parallel and len(chunks) > 1:
        list(_noise_pool().map(one, chunks))
    else:
        for chunk in chunks:
            one(chunk)
    if not contiguous:
        tensor.add_(target.view(tensor.shape))


_POOL = None


def _noise_pool():
    """Threads for drawing noise chunks (created on first use; one per core, at most 16)."""
    global _POOL
    if _POOL is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1)), thread_name_prefix="dp-noise")
    return _POOL


# -- on the device ------------------------------------------------------------------------------
DEVICE_CHUNK = 1 << 23  # values drawn per chunk on the device (about 0.2 GiB of temporaries at the peak)
DEVICE_STREAMS = 3      # independently keyed generators whose bits are XOR-ed (see add_gaussian_cuda_)


def add_gaussian_cuda_(tensor: torch.Tensor, std: float, key: SecretKey, *labels: int | str) -> None:
    """In place, on the tensor's CUDA device: tensor += N(0, std^2) per coordinate.

    Why on the device: a GPU step takes tens of milliseconds, and drawing a billion-parameter model's
    noise on the host (about 12 ns a value) and copying it over would cost many steps' time.

    How: torch's CUDA generator is Philox4x32-10, whose key is its 64-bit seed, and a single 64-bit
    key can be searched. So each value's uniform bits are the XOR of DEVICE_STREAMS = 3 streams of
    63 random bits, each from its own generator, keyed by 64 bits derived from the secret and
    (labels, chunk, stream); a Box-Muller transform in float64 turns pairs of 53-bit uniforms into
    pairs of normals. Assuming Philox4x32-10 behaves as a pseudo-random function (as the host path
    assumes of Philox4x64-10; its designers claim statistical, not cryptographic, strength), while
    any one stream's key is unknown the XOR is uniform whatever the others are (a one-time pad), so
    no key or pair of keys can be tested on its own: an attacker must find all three of a chunk
    together, and a meet-in-the-middle split still costs about 2^128 time with 2^64 memory per chunk
    (one table of Philox outputs serves every chunk: with N chunks observed, time x memory about
    2^192 / N). Adding the normals of two generators instead would not do: the sum correlates with
    each half, so each 64-bit key could be found by its own scan. Derived keys collide with
    probability about 2^-64 per pair: across chunks that repeats nothing unless all three streams
    collide; two streams of one chunk colliding cancel, leaving one 64-bit key (about 3 x 2^-64 per
    chunk).
    The draws are a function of (key, labels) and of the device: torch's kernel grid follows the
    GPU's multiprocessor count (``cuda_fingerprint``), so replicas that must apply identical noise
    need identical devices (dist_dpc.privacy.noise)."""
    if not tensor.is_cuda:
        raise ValueError(f"add_gaussian_cuda_ draws on a CUDA device; this tensor is on {tensor.device}")
    _add_keyed_box_muller_(tensor, std, key, *labels)


def _add_keyed_box_muller_(tensor: torch.Tensor, std: float, key: SecretKey, *labels: int | str) -> None:
    """add_gaussian_cuda_'s construction on any device (on the CPU torch's generator is mt19937, which
    keeps 32 bits of a seed: there it is for tests of the construction only, never for noise)."""

    def draw(target: torch.Tensor, chunk: int) -> None:
        count = target.numel()
        bits = torch.zeros(2 * ((count + 1) // 2), dtype=torch.int64, device=target.device)
        stream_bits = torch.empty_like(bits)
        for stream in range(DEVICE_STREAMS):
            generator = stream_generator(target.device, key.uint64(*labels, "device-chunk", chunk, "stream", stream))
            bits.bitwise_xor_(stream_bits.random_(generator=generator))  # uniform on [0, 2^63)
        del stream_bits
        target.add_(box_muller_(bits)[:count].mul_(std).to(target.dtype))

    _add_by_chunks_(tensor, DEVICE_CHUNK, draw)


def stream_generator(device: torch.device, seed: int) -> torch.Generator:
    """One stream's generator: all 64 bits of ``seed`` are Philox4x32-10's key on a CUDA device."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def box_muller_(bits: torch.Tensor) -> torch.Tensor:
    """Pairs of standard normals (float64) from an even number of 63-bit words (int64 in [0, 2^63)),
    overwriting ``bits``: word i of the first half gives the radius, word i of the second the angle.
    u = (top 53 bits + 1/2) / 2^53 lies in (0, 1] (the largest word rounds to 1.0, radius 0), never 0,
    so no draw is infinite: |z| <= sqrt(-2 ln(2^-54)) = 8.65."""
    pairs = bits.numel() // 2
    uniform = bits.bitwise_right_shift_(10).to(torch.float64).add_(0.5).mul_(2.0 ** -53)
    radius = uniform[:pairs].log_().mul_(-2.0).sqrt_()
    angle = uniform[pairs:].mul_(2 * math.pi)
    return torch.cat([radius * torch.cos(angle), radius.mul_(torch.sin(angle))])


def cuda_fingerprint(device: torch.device) -> str:
    """What torch's CUDA random_ kernel's draws depend on besides the key: the torch build and the
    launch grid, which follows the device's multiprocessors and threads per multiprocessor."""
    props = torch.cuda.get_device_properties(device)
    return "|".join(str(part) for part in (
        torch.__version__, torch.version.cuda, props.name, props.multi_processor_count,
        getattr(props, "max_threads_per_multi_processor", "?")))
