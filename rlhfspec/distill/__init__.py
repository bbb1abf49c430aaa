"""Distilling a small draft model from the policy (and refreshing it as the policy drifts)."""
