"""Hugging Face interop, one concept per module.

- ``config``: ``config.json`` <-> ``LlamaConfig`` (both transformers layouts), and
  :func:`~oasst_jax.hf.config.is_hf_dir`, the one "is this a HF directory" test;
- ``layout``: tensor names and layouts, HF ``[out, in]`` <-> our stacked param tree;
- ``safetensors_io``: reading (no pickle, index confined to the directory, damaged
  files as one line) and sharded writing;
- ``tokenizer``: tokenizer files + the chatml ``chat_template`` for an export;
- ``load``: a HF directory as our param tree, and ``load_start_params``, the one
  "start weights from an orbax checkpoint or a HF directory" of train and sample;
- ``convert``: HF directory <-> orbax checkpoint, what ``python -m oasst_jax.convert`` runs.
"""
