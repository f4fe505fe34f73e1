"""Configs in, results out: the ``prune`` API, validated configs and recipes, atomic export, input
checks, resumable studies, tables and plots."""
