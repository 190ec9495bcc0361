"""Evaluations of archived models, with and without interventions on their math-only sets."""
