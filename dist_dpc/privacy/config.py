"""What the user asks of the privacy mechanism. Checked here, enforced by the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(kw_only=True)
class PrivacyConfig:
    enabled: bool = True
    """Train with DP-SGD. false trains without any privacy guarantee and says so loudly."""
    target_epsilon: float | None = 8.0
    """Epsilon to reach at the end of training; sigma is calibrated for it. null: give noise_multiplier."""
    noise_multiplier: float | None = None
    """Sigma of the Gaussian noise, in units of max_grad_norm. Set it instead of target_epsilon, or
    with it (then the run refuses to start if the planned steps exceed target_epsilon)."""
    delta: float | None = None
    """Delta of (epsilon, delta)-DP. null: 1/N^1.1 for N training examples. Must be < 1/N."""
    max_grad_norm: float = 1.0
    """Per-sample clipping threshold C (the L2 sensitivity of the summed gradient)."""
    clipping: Literal["flat", "per_layer"] = "per_layer"
    """flat: one norm over all parameters (papers' semantics; one forward and one backward at every
    ZeRO stage, book-keeping).
    per_layer: thresholds C_l = C/sqrt(L) for each of the L layers, one forward and one backward."""
    sampling: Literal["poisson", "shuffle"] = "poisson"
    """poisson: each example joins a logical batch independently with probability q (what the
    accountant assumes). shuffle: fixed-size batches from a per-epoch permutation, only without
    privacy (privacy.enabled=false): the accountants analyse Poisson sampling, so a private run with
    shuffled batches would report an epsilon that is not a proven bound; it is refused."""
    accountant: Literal["prv", "rdp"] = "prv"
    """Accountant for epsilon (the other one is logged beside it)."""
    randomness: Literal["secure", "insecure_reproducible"] = "secure"
    """secure: noise and Poisson batches come from a 256-bit key drawn from the OS on rank 0, sent to
    the other ranks in memory and never written anywhere; a restarted phase draws fresh noise and
    batches for its remaining steps (the accountant continues from the checkpoint, so epsilon is right).
    insecure_reproducible: the key is derived from privacy.noise_seed, or from a seed drawn once and
    kept in the run tree's noise_seed.json, so a resumed run is bit-identical. It WEAKENS the guarantee:
    anyone who reads noise_seed.json or knows privacy.noise_seed can regenerate and subtract the noise."""
    noise_sampler: Literal["auto", "host", "device"] = "auto"
    """Where DP-SGD's Gaussian noise is drawn. host: numpy Philox with 128-bit keys on the CPU, then
    copied to the gradients' device (the same draws on any hardware). device: on the CUDA device that
    holds the optimizer partition, from torch's Philox, the bits of three independently keyed streams
    XOR-ed (dist_dpc.privacy.randomness.add_gaussian_cuda_): a billion-parameter model's noise in
    milliseconds instead of seconds of host time. auto: device where every rank's partition is on a
    GPU and its sampler passes a start-up self-test (and, at ZeRO 0 with several ranks, every rank's
    GPU draws identically), else host. With randomness=insecure_reproducible a resumed run repeats its
    noise only on the same sampler, GPU model and torch build: set host to repeat it anywhere."""
    noise_seed: int | None = None
    """Only with randomness=insecure_reproducible: the seed the key is derived from (null: drawn once
    and kept in RUN/noise_seed.json). Knowing it removes all privacy."""
    public_model_dirs: list[str] = field(default_factory=list)
    """Local model directories without a dist-dpc privacy lineage (privacy_lineage.json) that you
    declare were trained on public data only. Any other such directory is refused as a model, teacher,
    student or pruning source: it might have seen the private data without DP. The declaration is
    recorded in the ledger (public:<directory>)."""
    max_effective_noise: float | None = 0.1
    """Refuse, before training, a phase whose noise on each coordinate of the averaged clipped gradient,
    sigma / B (in units of max_grad_norm; B the expected batch), exceeds this: the training set is too
    small for the requested epsilon at this batch, and DP fine-tuning would learn nothing. The refusal
    says the smallest epsilon the data allows at this limit. Good DP fine-tuning runs sit near 0.001-0.01
    (Li et al. 2022: sigma ~1, B ~1000). A usefulness guard, not a privacy one; null: no check."""
    release_exact_statistics: bool = False
    """For debugging only: log the exact training-set statistics (train loss, clipped fractions,
    per-sample gradient-norm quantiles, realised batch sizes, token counts, norm methods). This
    BREAKS the DP guarantee for what it releases: none of them is noised or accounted. Runs that
    use it are marked (results.json, `dpc report`, the model card)."""

    @property
    def releases_training_statistics(self) -> bool:
        """Whether exact statistics of the training data may leave the run: without DP nothing is
        protected anyway; with DP only under the debug switch."""
        return not self.enabled or self.release_exact_statistics

    def __post_init__(self) -> None:
        if self.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm={self.max_grad_norm!r} is invalid: must be > 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon!r} is invalid: must be > 0 (or null with privacy.noise_multiplier set)")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier!r} is invalid: must be >= 0")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta!r} is invalid: must be in (0, 1) and below 1/N")
        if self.max_effective_noise is not None and not self.max_effective_noise > 0:
            raise ValueError(f"privacy.max_effective_noise={self.max_effective_noise!r} is invalid: must be > 0, or "
                             "null for no check")
        if self.noise_seed is not None and self.randomness != "insecure_reproducible":
            raise ValueError(f"privacy.noise_seed={self.noise_seed!r} is only accepted with "
                             "privacy.randomness=insecure_reproducible (anyone who knows the seed can subtract the "
                             "noise): remove privacy.noise_seed, or set privacy.randomness=insecure_reproducible")
        if self.randomness not in ("secure", "insecure_reproducible"):
            raise ValueError(f"privacy.randomness={self.randomness!r} is invalid: allowed values are 'secure', "
                             "'insecure_reproducible'")
        if self.noise_sampler not in ("auto", "host", "device"):
            raise ValueError(f"privacy.noise_sampler={self.noise_sampler!r} is invalid: allowed values are 'auto', "
                             "'host', 'device'")
        if self.enabled and self.sampling != "poisson":
            raise ValueError(f"privacy.sampling={self.sampling!r} with privacy.enabled=true is refused: the "
                             "accountant's epsilon holds for Poisson sampling only, not for fixed-size shuffled "
                             "batches. Use privacy.sampling=poisson (the default), or privacy.enabled=false for a "
                             "non-private comparison")
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("privacy: set privacy.target_epsilon (sigma is then calibrated) or privacy.noise_multiplier")
