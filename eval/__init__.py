"""Metrics, evaluation runs, leaderboards and reports. Imports nothing from gen or recon."""
