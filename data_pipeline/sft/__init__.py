"""Supervised fine-tuning data (`kiln data sft recipes/sft/<recipe>.yaml`): agent trajectories and general
chat read from many formats into one canonical conversation, rendered with a chat template, labelled from one
render per conversation, mixed at a target agent share (AgentTuning's eta), packed best-fit-decreasing into
fixed-length sequences with an explicit document index, and written in the trainer's indexed format with a
report of every kept and dropped row. See data_pipeline/CONTRACTS.md ("SFT packed datasets") for the format.

One concern per module: `messages` (canonical conversation, structural checks), `readers` (formats),
`templates` (Jinja chat templates), `tokenizer_files` (tokenizer folder in and out), `labels` (ids and loss
mask from one render), `length` (too-long policy), `mixing` (eta, weights, oversampling), `packing`
(best-fit-decreasing), `indexed` (megatron-core indexed files, written and read without megatron), `writer`
(packed sequences + meta), `dataset` (the trainer's reader of packed sequences), `report`, `build` (the whole
build), `config`, `cli`, `testing` (tokenizers for the tests).

Nothing is imported here: `kiln --help` registers `cli` without loading any of it.
"""
