"""Hugging Face interop, one concept per module.

- ``config``: ``config.json`` <-> ``LlamaConfig`` (both transformers layouts), and
  :func:`~oasst_jax.hf.config.is_hf_dir`, the one "is this a HF directory" test;
- ``layout``: tensor names and layouts, HF ``[out, in]`` <-> our stacked param tree;
- ``safetensors_io``: reading (no pickle, index confined to the directory, damaged
  files as one line) and sharded writing;
- ``tokenizer``: tokenizer files + the chatml ``chat_template`` for an export;
- ``load``: a HF directory as our param tree (``oasst_jax.weights`` is the one loader of
  train, sample and evaluate, orbax or HF);
- ``convert``: HF directory <-> orbax checkpoint, what ``python -m oasst_jax.convert`` runs.
"""
