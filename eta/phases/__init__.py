"""The five phases of a search, one module each, named as the CLI verbs and the run folders are:
``teacher``, ``latency``, ``pretrain`` (phase 1), ``solve`` (phase 2), ``finetune`` (phase 3).

Each module has ``run`` (compute and write its outputs into the run directory) and ``load`` (read
them back once finished); :mod:`eta.pipeline` orders them and keeps the manifest.
"""
