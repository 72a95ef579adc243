"""`cljax-merge`: out-of-core merges of Hugging Face (safetensors) and Orbax checkpoints.

The IO side of merging; the algorithms it runs are `cljax.merging`'s pure functions.

  mergekit_config      the YAML config (mergekit's common subset), checked strictly
  recipes              what each merge_method computes on one tensor block, through the library
  checkpoint_merge     the driver: read blocks, merge, write shards (`merge_checkpoints`)
  magnitude_select     streaming radix selection of TIES thresholds over many blocks
  safetensors_reader   safetensors / Orbax inputs, read by tensor and row range
  safetensors_writer   sharded safetensors output with a Hugging Face index
  cli                  the ``cljax-merge`` command (``python -m cljax.merge_io.cli``)

Only this package and `cljax.checkpoint` reach Orbax (through `cljax.checkpoint`).
"""
