"""The run config: one typed tree, loaded from YAML, overridden by ``section.key=value``, saved per run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dist_dpc.compress.config import DistillConfig, DistillSyntheticConfig, PruneConfig
from dist_dpc.data.config import DataConfig
from dist_dpc.models.config import LoraSettings, ModelConfig
from dist_dpc.privacy.config import PrivacyConfig


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name: the run directory is output_dir/name."""
    output_dir: str = "runs"
    """Where run directories are created."""
    seed: int = 0
    """Seed of the model head initialisation and of the data subset."""
    overwrite: bool = False
    """Allow writing into an existing run directory that holds a finished run (never deletes it)."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name={self.name!r} is invalid: a non-empty name without '/'")


@dataclass(kw_only=True)
class RunModelConfig(ModelConfig):
    """The model section of a run: ModelConfig with the recipe's defaults (docs/RESULTS.md). Code that
    loads a saved or pre-trained model builds a plain ModelConfig (no adapters, nothing frozen)."""
    freeze_embeddings: bool = True
    """Freeze the embedding layers (fewer trainable parameters under DP; with LoRA they are frozen anyway)."""
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    """DP-LoRA (default r 8, alpha 16, on the attention query and value): adapters train, the
    pre-trained weights are frozen; the head (parameters matching model.trainable, default classifier,
    pooler and score) trains too. Saved models are merged (a plain Hugging Face directory). null: no
    adapters; what model.trainable selects (default everything) trains."""


@dataclass(kw_only=True)
class TrainConfig:
    """Defaults: the DP recipe of docs/RESULTS.md (Li et al., ICLR 2022: large expected batches, few
    epochs, a learning rate scaled up for DP; with DP-LoRA and head_init), chosen on SST-2 and the
    Yelp validation splits and frozen; the same values serve a non-private run."""
    epochs: float = 6.0
    """Passes over the training set (in expected samples: steps = epochs * N / batch_size)."""
    max_steps: int | None = None
    """Cap on logical steps (overrides epochs when smaller)."""
    batch_size: int = 512
    """Expected logical batch size B = q * N (Poisson sampling draws around it)."""
    micro_batch_size: int = 64
    """Rows per micro-batch per rank (a memory knob; no effect on the maths)."""
    lr: float = 3e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay (AdamW)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer, when the DeepSpeed config names none."""
    momentum: float = 0.0
    """Momentum of the sgd optimizer."""
    lr_schedule: Literal["constant", "linear"] = "linear"
    """constant, or linear decay from lr (after warm-up) to lr/(T-W) at a phase's last step (per round when pruning)."""
    warmup_steps: int = 3
    """Steps of linear warm-up from lr/(W+1) up to lr."""
    zero_stage: int | None = None
    """ZeRO stage 0-3 (null: the DeepSpeed config's, else 0)."""
    deepspeed_config: str | None = None
    """Path of a DeepSpeed JSON config (ds_configs/zero2.json ...). Batch sizes are derived, not read from it."""
    bf16: bool = False
    """bf16 mixed precision (GPU)."""
    eval_batch_size: int = 128
    """Rows per evaluation batch."""
    log_every: int = 10
    """Log a line every this many steps."""
    eval_every: int = 0
    """Evaluate on the evaluation split(s) every this many steps and log eval/<split>/loss and
    accuracy (0: only at the end). With DP these are how progress is watched: the training loss is
    computed from the private data and is not released."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: only when interrupted or at the end)."""
    keep_checkpoints: int = 1
    """Checkpoints kept (older ones are deleted only after a newer one is complete)."""

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"train.epochs={self.epochs!r} is invalid: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps!r} is invalid: must be >= 1 or null")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every!r} is invalid: must be >= 0 (0: only at the end)")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every={self.checkpoint_every!r} is invalid: must be >= 0")
        for key in ("batch_size", "micro_batch_size", "eval_batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)!r} is invalid: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr!r} is invalid: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps!r} is invalid: must be >= 0")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage={self.zero_stage!r} is invalid: allowed values are 0, 1, 2, 3")


@dataclass(kw_only=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline writes runs locally (sync them later with `wandb sync`)."""
    project: str = "dist-dpc"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team)."""


@dataclass(kw_only=True)
class ClusterConfig:
    executor: Literal["slurm", "local", "debug"] = "local"
    """Where `dpc submit` runs each phase: a SLURM job (submitit), a local process, or in-process (debug)."""
    nodes: int = 1
    """Nodes per phase job."""
    tasks_per_node: int = 1
    """Processes per node (one per GPU)."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 on CPU clusters)."""
    cpus_per_task: int = 2
    """CPU cores per process."""
    mem_gb: float | None = None
    """Memory per node in GB (null: the partition's default)."""
    time_min: int = 60
    """Wall-clock limit of a phase job, in minutes."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    qos: str | None = None
    """SLURM QOS."""
    constraint: str | None = None
    """SLURM node constraint (e.g. a GPU type)."""
    sbatch_extra: dict[str, str] = field(default_factory=dict)
    """Further sbatch options, as they would be written after #SBATCH --, e.g. {reservation: abc}."""
    max_requeues: int = 3
    """Times a phase that reaches its time limit is requeued by submitit (it resumes from its last
    checkpoint); requeues after a preemption are not counted by submitit."""

    def __post_init__(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster.{key}={getattr(self, key)!r} is invalid: must be >= 1")
        if self.gpus_per_node < 0:
            raise ValueError(f"cluster.gpus_per_node={self.gpus_per_node!r} is invalid: must be >= 0")


SPENDING_PHASES = ("tune", "teacher", "histogram", "distill", "prune")  # read the private data under DP
MODEL_PHASES = ("tune", "teacher", "distill", "prune", "distill_synthetic")  # write RUN/PHASE/model
# distill_synthetic trains on DP output only (post-processing): it writes a model and spends nothing.
ALL_PHASES = (*SPENDING_PHASES, "distill_synthetic", "eval", "export", "generate")
DEFAULT_PHASES = ("teacher", "distill", "prune", "eval", "export")  # tune only when asked (it needs tune.search)


@dataclass(kw_only=True)
class PipelineConfig:
    phases: list[str] = field(default_factory=lambda: list(DEFAULT_PHASES))
    """Phases run by `dpc pipeline` / `dpc submit`, in order (each writes run_dir/PHASE)."""
    budget_split: dict[str, float] = field(default_factory=dict)
    """Share of privacy.target_epsilon per spending phase, e.g. {teacher: 0.5, distill: 0.5} (empty:
    equal shares). Phase k is calibrated so that the composition of phases 1..k reaches the sum of
    their shares times the target; the last one brings the total to the target exactly."""
    export_source: str = "auto"
    """Phase whose model `export` writes (auto: the last model-producing phase in phases)."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.phases if p not in ALL_PHASES]
        if unknown or not self.phases or len(set(self.phases)) != len(self.phases):
            raise ValueError(f"pipeline.phases={self.phases!r} is invalid: a list of distinct phases among "
                             f"{', '.join(ALL_PHASES)}")
        spending = [p for p in self.phases if p in SPENDING_PHASES]
        bad = [p for p in self.budget_split if p not in spending]
        if bad:
            raise ValueError(f"pipeline.budget_split names {bad}, which are not spending phases of pipeline.phases "
                             f"({', '.join(spending) or 'none'})")
        if any(v <= 0 for v in self.budget_split.values()):
            raise ValueError(f"pipeline.budget_split={self.budget_split!r} is invalid: shares must be > 0")
        if self.budget_split and set(self.budget_split) != set(spending):
            raise ValueError(f"pipeline.budget_split must give a share to every spending phase ({', '.join(spending)}), "
                             f"got {sorted(self.budget_split)}")
        if self.export_source not in ("auto", *MODEL_PHASES):
            raise ValueError(f"pipeline.export_source={self.export_source!r} is invalid: allowed values are auto, "
                             f"{', '.join(MODEL_PHASES)}")

    def cumulative_share(self, phase: str) -> float:
        """Fraction of the target the composition may reach once ``phase`` is done."""
        spending = [p for p in self.phases if p in SPENDING_PHASES]
        if phase not in spending:
            return 1.0  # a phase run on its own (or `dpc train`) may spend the whole budget
        shares = self.budget_split or {p: 1.0 for p in spending}
        total = sum(shares[p] for p in spending)
        upto = spending[:spending.index(phase) + 1]
        return 1.0 if upto == spending else sum(shares[p] for p in upto) / total


@dataclass(kw_only=True)
class HeadInitConfig:
    """Before DP fine-tuning, a DP start for the classifier head of a BERT-style model
    (docs/privacy.md, "Head initialisation"). Both steps read the private data and are recorded in
    the ledger under the phase that runs them; every training phase (teacher, distill, each prune
    round) runs them on its own model."""
    centre_pooler: bool | None = None
    """null (default): on for a BERT-style classifier, off for any other head. Replace the pooler by tanh([CLS] - m), m a DP mean of the [CLS] states of the training set
    (one Gaussian mechanism, q = 1). Pre-trained sentence encoders (e.g. minilm) have a pooler that
    was never trained and a [CLS] with a large common component: the head then learns nothing
    under DP noise."""
    freeze_pooler_weight: bool = True
    """With centre_pooler: keep the pooler's identity weight fixed during DP fine-tuning (its bias
    still trains if model.trainable selects it). Its per-coordinate signal is far below the noise,
    so training it mostly adds a random matrix of lr-sized entries to the identity, which mixes the
    [CLS] components the probed head relies on (measured: docs/results_history.md)."""
    mean_clip_norm: float = 10.0
    """[CLS] states are clipped to this L2 norm for the DP mean (its sensitivity)."""
    mean_noise_multiplier: float | None = None
    """sigma of the DP mean: noise N(0, (sigma * mean_clip_norm)^2) on the sum of N clipped states.
    null (default): scaled to the data, 0.06 N / sqrt(hidden size) within [5, 20], so that the noise on the
    mean has norm about 6 % of mean_clip_norm whatever N (a fixed 20 swamped the features of small
    sets: docs/RESULTS.md); N and the hidden size are public."""
    probe_epochs: float | None = None
    """Epochs of a DP linear probe: DP-SGD on the classifier alone, on fixed pooled features, at the
    phase's batch size and sigma (its steps add to the phase's DP-SGD steps). 0: no probe. null
    (default): 2 for a BERT-style classifier, 0 for any other head."""
    probe_lr: float = 0.05
    """Adam learning rate of the probe."""

    def __post_init__(self) -> None:
        for key in ("mean_clip_norm", "mean_noise_multiplier", "probe_lr"):
            if key == "mean_noise_multiplier" and self.mean_noise_multiplier is None:
                continue
            if not getattr(self, key) > 0:
                raise ValueError(f"head_init.{key}={getattr(self, key)!r} is invalid: must be > 0")
        if self.probe_epochs is not None and self.probe_epochs < 0:
            raise ValueError(f"head_init.probe_epochs={self.probe_epochs!r} is invalid: must be >= 0 (0: no probe)")

    def resolved(self, bert_style: bool, model: str, *, dataset_size: int | None = None,
                 hidden_size: int | None = None) -> "HeadInitConfig":
        """The settings for a model: null (auto) means on for a BERT-style classifier (measured to
        help: docs/RESULTS.md), off for any other head; explicit values are kept as given, and
        refused (naming ``model``) when they ask for head_init on a head it cannot serve. A null
        mean_noise_multiplier is scaled to the training set's public size and the model's width."""
        sigma = self.mean_noise_multiplier
        if sigma is None and dataset_size and hidden_size:
            sigma = mean_noise_for(dataset_size, hidden_size)
        out = dataclasses.replace(
            self, centre_pooler=bert_style if self.centre_pooler is None else self.centre_pooler,
            probe_epochs=(AUTO_PROBE_EPOCHS if bert_style else 0.0) if self.probe_epochs is None else self.probe_epochs,
            mean_noise_multiplier=sigma)
        if out.centre_pooler and out.mean_noise_multiplier is None:
            raise ValueError("head_init.mean_noise_multiplier=null is scaled to N and the hidden size, which this "
                             "caller did not give: set head_init.mean_noise_multiplier")
        if out.enabled and not bert_style:
            raise ValueError("head_init.centre_pooler / head_init.probe_epochs needs a BERT-style classifier ([CLS] -> "
                             f"pooler dense+tanh -> linear classifier); {model} has none: set them off (or null) "
                             "for this model")
        return out

    @property
    def enabled(self) -> bool:
        if self.centre_pooler is None or self.probe_epochs is None:
            raise RuntimeError("head_init settings are resolved for a model first (HeadInitConfig.resolved)")
        return self.centre_pooler or self.probe_epochs > 0


AUTO_PROBE_EPOCHS = 2.0
MEAN_NOISE_CAP = 20.0        # the DP mean's sigma never exceeds the old fixed value
MEAN_NOISE_FLOOR = 5.0       # nor goes below 5 (epsilon 0.74 alone at delta 1e-5): tiny sets keep a budget for DP-SGD
MEAN_NOISE_ERROR = 0.06      # expected norm of its noise on the mean, as a fraction of mean_clip_norm


def mean_noise_for(dataset_size: int, hidden_size: int) -> float:
    """head_init's default DP-mean sigma: the noise on the mean of N clipped states (norm <= R) has
    expected norm about sigma R sqrt(d) / N; this keeps it near MEAN_NOISE_ERROR * R."""
    import math

    return min(MEAN_NOISE_CAP, max(MEAN_NOISE_FLOOR, MEAN_NOISE_ERROR * dataset_size / math.sqrt(hidden_size)))


TUNE_MODES = ("private", "public_proxy")


@dataclass(kw_only=True)
class GenerateConfig:
    """`dpc generate`: sampling from a trained causal LM (post-processing of a DP model: spends nothing)."""
    source: str = "auto"
    """Model to sample from: a phase of this run tree (teacher, train), a model directory, or auto
    (the teacher's model, else `dpc train`'s)."""
    prompts: dict[str, int] = field(default_factory=dict)
    """Control codes (tab-separated, as in the training data) -> number of samples, e.g.
    {"Business Category: Bars\tReview Stars: 5.0": 100}; "" samples without control codes."""
    prompts_file: str | None = None
    """A .json / .jsonl file of {"codes": [...], "count": n} records, added to generate.prompts. The
    prompts and counts are released with the samples as given: counts taken from the private data
    (e.g. its label histogram) are a release of that data unless they come from a DP mechanism in the
    ledger."""
    max_new_tokens: int = 64
    """Tokens generated per sample at most (a sample ends earlier at EOS)."""
    temperature: float = 1.0
    """Softmax temperature of the sampling."""
    top_k: int = 50
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 0.9
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating any n-gram of this size within a sample (0: off)."""
    batch_size: int = 16
    """Samples generated together (all of one prompt). A batch is the unit of sharding and resuming."""
    shards: int = 1
    """Shards of the samples (`dpc submit` runs them as a SLURM array; ranks under torchrun split each
    shard). Batch b belongs to shard b % shards, so the output does not depend on shards or ranks."""
    seed: int = 0
    """Seed of the sampling: batch b draws from seed (seed, b), so a rerun reproduces every sample."""

    def __post_init__(self) -> None:
        for key in ("max_new_tokens", "batch_size", "shards"):
            if getattr(self, key) < 1:
                raise ValueError(f"generate.{key}={getattr(self, key)!r} is invalid: must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"generate.temperature={self.temperature!r} is invalid: must be > 0")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"generate: top_k={self.top_k} (>= 0), top_p={self.top_p} (in (0, 1]) and "
                             f"no_repeat_ngram_size={self.no_repeat_ngram_size} (>= 0) out of range")
        bad = {k: v for k, v in self.prompts.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"generate.prompts: counts must be integers >= 0, got {bad}")


@dataclass(kw_only=True)
class HistogramConfig:
    """Phase histogram: a DP histogram of the private training set's control codes (Gaussian mechanism
    on every category's count, in the ledger), post-processed into the prompt allocation that
    `generate` samples by when it is given no prompts."""
    code_values: list[list[str]] | None = None
    """The public schema: the possible values of each control-code column, in the order of
    data.control_code_columns; the categories are all their combinations (null: the published Yelp
    codes for data.task=yelp). Never read from the private data: which categories exist is itself
    information about it. A record whose codes are not in the schema is counted nowhere."""
    noise_multiplier: float | None = None
    """sigma of the Gaussian noise on each count (sensitivity 1). null: calibrated to the phase's share
    of privacy.target_epsilon (pipeline.budget_split)."""
    samples: int | None = None
    """Synthetic samples to allocate (null: N, the private training set's public size)."""

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"histogram.noise_multiplier={self.noise_multiplier!r} is invalid: must be > 0 (a "
                             "histogram without noise is not DP), or null to calibrate it")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"histogram.samples={self.samples!r} is invalid: must be >= 1 or null (N)")
        if self.code_values is not None and (not self.code_values or any(not v for v in self.code_values)):
            raise ValueError("histogram.code_values: give a non-empty list of values per control-code column")


@dataclass(kw_only=True)
class AuditConfig:
    """`dpc audit`: an empirical lower bound on epsilon from one training run (Steinke, Nasr &
    Jagielski, NeurIPS 2023), in its own run tree RUN-audit that is never released (docs/audit.md)."""
    kind: Literal["white_box", "black_box"] = "white_box"
    """white_box: gradient canaries on a linear model with one coordinate per canary, trained with the
    config's DP-SGD settings (audits the mechanism: sampling, clipping, noise, ZeRO, ranks, accounting).
    black_box: input canaries (random-label out-of-distribution texts for classifiers, random secrets
    after a fixed prefix for causal LMs) added to the private training set of the config's own model,
    scored by how much training lowered their loss (audits the whole run, loosely)."""
    canaries: int = 1000
    """m: canaries, each included in the training set independently with probability 1/2."""
    confidence: float = 0.95
    """The lower bound holds with this probability (over the inclusion coins and the training run)."""
    phase: Literal["train", "teacher"] = "train"
    """Whose DP-SGD settings are audited: train (`dpc train`: all of privacy.target_epsilon) or teacher
    (its pipeline.budget_split share): the claimed epsilon, N, batch size, epochs, clipping, sampling,
    optimizer, ZeRO stage and precision, on as many ranks as the audit is launched with."""
    synthetic_samples: int = 0
    """Black-box audit of a causal LM only: after training, the audit model writes this many samples
    with the generate settings (generate.prompts scaled to this number, or unconditional), and the
    report says whose secrets appear in that text and the epsilon bound from the text alone (0: off)."""
    test: Literal["f_dp", "one_run"] = "f_dp"
    """f_dp: the guesses against the run's whole trade-off curve (Mahloujifar, Melis & Chaudhuri, ICML
    2025; tighter); one_run: against one (epsilon, delta) pair (Steinke, Nasr & Jagielski, 2023)."""
    guess_fractions: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    """Fixed before training (no peeking): for each f the auditor guesses "in" for the f*m/2 highest
    scores and "out" for the f*m/2 lowest; the bound is the best of these tests, each at
    (1 - confidence) / len(guess_fractions) (Bonferroni), so choosing among them costs confidence."""

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"audit.canaries={self.canaries!r} is invalid: need at least 2 canaries (1,000 is the default)")
        if not 0 < self.confidence < 1:
            raise ValueError(f"audit.confidence={self.confidence!r} is invalid: must be in (0, 1), e.g. 0.95")
        if self.synthetic_samples < 0:
            raise ValueError(f"audit.synthetic_samples={self.synthetic_samples!r} is invalid: give a number of samples "
                             ">= 0 (0: off)")
        if self.synthetic_samples and self.kind != "black_box":
            raise ValueError("audit.synthetic_samples needs audit.kind=black_box (secrets in a causal LM's training "
                             "set); the white-box audit trains a linear model that writes no text")
        if not self.guess_fractions or any(not 0 < f <= 1 for f in self.guess_fractions):
            raise ValueError(f"audit.guess_fractions={self.guess_fractions!r} is invalid: give fractions in (0, 1]")


@dataclass(kw_only=True)
class TuneConfig:
    """`dpc tune`: hyper-parameter selection that is itself accounted (docs/tuning.md)."""
    search: dict[str, list[Any]] = field(default_factory=dict)
    """Config keys and their candidate values, e.g. {train.lr: [2e-4, 5e-4, 1e-3], train.epochs: [2, 4]}:
    the candidates are the grid of all combinations."""
    mode: str = "private"
    """private: Papernot & Steinke (ICLR 2022): a random number K of trials (K secret), each a DP run on
    the training set minus a private holdout scored by a DP accuracy on the holdout; only the best
    trial is released and the selection's RDP curve goes into the ledger. public_proxy: every candidate
    is trained and scored on the public data set named by tune.proxy_data (no private example used, no
    privacy spent; the ledger records the declaration)."""
    epsilon: float | None = None
    """private: the epsilon of the whole selection (all trials together, at privacy.delta). null: half of
    privacy.target_epsilon. The later phases of the tree compose with it within privacy.target_epsilon."""
    expected_trials: float = 8.0
    """private: E[K], the expected number of trials (K ~ truncated negative binomial, tune.eta)."""
    eta: float = 1.0
    """private: shape of K's distribution (1: geometric, 0: logarithmic). Smaller eta costs less
    epsilon for the same E[K] but has a heavier tail (more trials sometimes)."""
    holdout_fraction: float = 0.1
    """private: fraction of the training set held out (data.seed) to score the trials."""
    score_noise_multiplier: float = 4.0
    """private: sigma of the Gaussian noise on the count of correct holdout predictions (sensitivity 1)."""
    proxy_data: dict[str, Any] = field(default_factory=dict)
    """public_proxy: data.* keys naming the public proxy data set, e.g. {task: sst2, data_dir: ...,
    max_train_samples: 5000}; trials train on its training split and are scored on its evaluation split."""

    def __post_init__(self) -> None:
        if self.mode not in TUNE_MODES:
            raise ValueError(f"tune.mode={self.mode!r} is invalid: allowed values are {', '.join(TUNE_MODES)}")
        for key, values in self.search.items():
            if key.count(".") != 1 or key.split(".")[0] not in ("train", "model", "head_init"):
                raise ValueError(f"tune.search key {key!r} is invalid: name a config key section.key of train, model "
                                 "or head_init (each trial is a `dpc train` run; privacy, data and run are fixed)")
            if not isinstance(values, list) or not values:
                raise ValueError(f"tune.search.{key}={values!r} is invalid: give a non-empty list of candidates")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"tune.epsilon={self.epsilon!r} is invalid: must be > 0 (or null: half the target)")
        if not self.expected_trials > 1:
            raise ValueError(f"tune.expected_trials={self.expected_trials!r} is invalid: must be > 1")
        if not (self.eta == 0 or self.eta >= 0.01):
            raise ValueError(f"tune.eta={self.eta!r} is invalid: must be 0 (logarithmic) or >= 0.01 (1: geometric; "
                             "a tiny positive eta would make drawing the number of trials take very long)")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError(f"tune.holdout_fraction={self.holdout_fraction!r} is invalid: must be in (0, 0.5)")
        if not self.score_noise_multiplier > 0:
            raise ValueError(f"tune.score_noise_multiplier={self.score_noise_multiplier!r} is invalid: must be > 0")
        if self.mode == "public_proxy" and not self.proxy_data:
            raise ValueError("tune.mode=public_proxy needs tune.proxy_data: the data.* keys of the public data set "
                             "(e.g. {task: sst2, data_dir: ../shared/data/glue})")

    def candidates(self) -> list[dict]:
        """The grid: one {key: value} per combination, in a fixed order."""
        import itertools

        keys = sorted(self.search)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.search[k] for k in keys))]


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: RunModelConfig = field(default_factory=RunModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    head_init: HeadInitConfig = field(default_factory=HeadInitConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    histogram: HistogramConfig = field(default_factory=HistogramConfig)
    distill_synthetic: DistillSyntheticConfig = field(default_factory=DistillSyntheticConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


def derived(original: Config, new: Config) -> Config:
    """``new`` (``original`` with values a phase set itself: tuned values, `dpc tune`'s holdout)
    remembers the config the user gave: that one is saved in the run tree and compared on resume."""
    new.user_config = user_config(original)
    return new


def user_config(cfg: Config) -> Config:
    return getattr(cfg, "user_config", cfg)


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    from dist_dpc.utils.config_loader import load

    return load(Config, path, overrides)
