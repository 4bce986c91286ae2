"""Evaluation of frozen backbones: feature extraction, weighted k-NN, linear probes.

Submodules import torch; this package file stays empty so ``ssl-distill --help`` stays instant.
"""
