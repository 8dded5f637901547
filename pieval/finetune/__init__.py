"""`pieval finetune`: extend a RoPE model with Position Interpolation and fine-tune it (paper Sec. 3.1).

- `config`: the settings (`FinetuneConfig`), from YAML/JSON and the command line.
- `data`: seeded, resumable streams of packed sequences / GovReport examples.
- `recipe`: the training loop, top to bottom.
- `checkpoint`: the run directory, atomic checkpoints, resume.
- `evaluate`: lm-eval tasks on each checkpoint, metrics per step.
- `cli`: the `pieval finetune` command.
"""
