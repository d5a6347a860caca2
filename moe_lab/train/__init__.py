"""Train a small Mixtral from scratch on the multi-domain corpus, and evaluate it.

Command line::

    python -m moe_lab.train --config configs/tiny-mixtral.json --out runs/tiny-mixtral
    python -m moe_lab.train --config configs/tiny-mixtral.json --out runs/tiny-mixtral --resume
    python -m moe_lab.train export --run runs/tiny-mixtral --out data/tiny-mixtral
    python -m moe_lab.train evaluate --model data/tiny-mixtral --config configs/tiny-mixtral.json [--write-card]

Python::

    from moe_lab.train import load_config, train
    result = train(load_config("configs/tiny-mixtral.json"), "runs/demo", max_steps=20)

What one training run does (all of it seeded, so two runs of the same config on the CPU give
bit-identical weights, and a resumed run matches an uninterrupted one):

1. Builds the corpus (:mod:`moe_lab.corpus`) or takes one you pass in, tokenises every document
   with the real Mixtral tokenizer (BOS at each document start) and caches the token arrays under
   ``<out>/tokens/``.
2. Packs each domain's training documents (shuffled) into windows of ``seq_len + 1`` tokens, so a
   training sequence comes from one domain; held-out documents are packed the same way, per domain.
3. Draws the whole batch schedule up front (which window of which domain at which step), so that
   resuming needs nothing but the step number.
4. Optimises ``ce + router_aux_loss_coef * load_balancing (+ router_z_loss_coef * z)`` with AdamW
   (decoupled weight decay, none on norms and embeddings), linear warm-up then cosine decay,
   gradient-norm clipping, optionally bf16 autocast (weights and optimizer stay fp32).
5. Writes ``training_log.jsonl`` (one JSON object per line, ``type`` = run / train / eval):
   losses, learning rate, gradient norm, and the per-layer expert load (share of the top-k
   assignments going to each expert) of the training batches; held-out cross-entropy and expert
   load per domain at every evaluation.
6. Saves ``router_snapshots.npz``: the top-k experts chosen for a fixed set of held-out probe
   tokens at regular steps (for router-saturation plots), and ``checkpoint.pt`` (model, optimizer,
   step, RNG states) for ``--resume``.

``evaluate_model`` measures a trained model against the quality bar of the demo model (held-out
cross-entropy per domain next to a unigram baseline, greedy samples, and the routing statistics of
:mod:`moe_lab.analysis` on a :func:`moe_lab.trace_routing` trace, as notebook 06 computes them)
and ``write_model_card`` turns that report into ``MODEL_CARD.md``.

The package, in the order a run uses it::

    config.py    TrainConfig (DataConfig, OptimConfig), load_config, lr_at
    data.py      tokenize_corpus (cached), pack_windows, inputs_targets, batch_schedule, prepare_data
    loop.py      train: training_step, logging, evaluation, router snapshots, checkpoints, resume
    evaluate.py  heldout CE, unigram baseline, routing_report (trace_routing + analysis), quality_bar
    card.py      write_model_card, one function per section
    export.py    export_run / write_evaluation: bf16 HF checkpoint + evaluation.json + MODEL_CARD.md
    __main__.py  the command line
"""

from .card import write_model_card  # noqa: F401
from .config import (  # noqa: F401
    CKPT_NAME,
    CONFIG_DIR,
    LOG_NAME,
    REPO_ROOT,
    SNAPSHOT_NAME,
    DataConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    lr_at,
)
from .data import (  # noqa: F401
    IGNORE,
    Dataset,
    TokenData,
    batch_schedule,
    batch_schedule_probabilities,
    corpus_fingerprint,
    get_corpus,
    inputs_targets,
    pack_documents,
    pack_windows,
    prepare_data,
    spread,
    tokenize_corpus,
)
from .evaluate import (  # noqa: F401
    CE_RATIO_MAX,
    DEFAULT_PROMPTS,
    EVERYDAY_MIN_SENTENCES,
    EVERYDAY_NLL_MAX,
    IN_DOMAIN_CHECK,
    LANG_DOMAINS,
    LOAD_RANGE,
    PROSE_ID_PREFIX,
    V3_CE_RATIO,
    classified_samples,
    classify_domain,
    cross_entropy_report,
    evaluate_heldout,
    evaluate_model,
    everyday_report,
    greedy_samples,
    heldout_ce,
    heldout_documents,
    load_summary,
    prose_ce_report,
    prose_documents,
    quality_bar,
    routing_report,
    router_saturation,
    routing_snapshot,
    trace_windows,
    unigram_baseline,
    unigram_logprobs,
)
from .export import (  # noqa: F401
    check_against_transformers,
    corpus_token_stats,
    export_run,
    run_facts,
    save_hf_checkpoint,
    training_data_facts,
    write_evaluation,
)
from .loop import (  # noqa: F401
    LOSS_KEYS,
    TrainResult,
    machine_description,
    make_optimizer,
    objective,
    read_log,
    train,
    training_step,
)
