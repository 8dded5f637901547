"""The paper's protocol parameters, in one place (Chen et al. 2023, arXiv 2306.15595).

Every default elsewhere in pieval that reproduces a protocol of the paper refers here, so a
reader can check them against the paper at a glance. Section numbers are the paper's (v2).
"""

# Sliding-window perplexity (Sec. 3.2, following Press et al. 2022).
STRIDE = 256  # tokens scored per window after the first
PROOFPILE_DOCS = 128  # random proof-pile test documents ...
PROOFPILE_MIN_TOKENS = 32768  # ... with at least this many LLaMA tokens, truncated to it

# Passkey retrieval (Sec. 3.3, prompt of Mohtashami & Jaggi 2023).
PASSKEY_NUM_DISTANCES = 32  # distances k uniformly spaced over (0, L']
PASSKEY_TRIALS = 10  # random keys per distance
PASSKEY_MIN_SUCCESS = 0.2  # k_max: largest k with success >= 20% at every k' <= k
PASSKEY_KEY_DIGITS = 5  # "a random 5-digit number"
PASSKEY_SEED = 0  # not the paper's (it gives none): any fixed seed reproduces the prompts; --metadata seed=...

# GovReport summarization (Sec. 3.4).
GOVREPORT_MAX_DOC_TOKENS = 15000  # documents truncated to their first 15000 tokens
GOVREPORT_MAX_GEN_TOKS = 1000  # generation length limit
GOVREPORT_TEMPERATURE = 0.5  # sampling temperature
GOVREPORT_TOP_P = 0.95  # nucleus sampling
GOVREPORT_VALIDATION_DOCS = 972  # SCROLLS gov_report validation split

# Fine-tuning after interpolation (Sec. 3.1).
FINETUNE_STEPS = 1000  # PI fine-tuning steps
FINETUNE_LR = 2e-5  # peak lr for 7B/13B (1e-5 for 33B/65B)
FINETUNE_BETAS = (0.9, 0.95)  # AdamW betas
FINETUNE_WEIGHT_DECAY = 0.0  # no weight decay
FINETUNE_WARMUP_STEPS = 20  # linear warm-up steps ...
FINETUNE_WARMUP_START = 0.1  # ... starting from 10% of the peak lr
FINETUNE_GLOBAL_BATCH = 64  # sequences per optimizer step (128 for some sizes)
DIRECT_FT_STEPS = 10000  # the "direct fine-tuning" (no interpolation) baseline

# Original-window benchmarks (Sec. 3.5), zero-shot at the base window.
ORIGINAL_WINDOW_TASKS = ("boolq", "piqa", "race", "winogrande")
