"""Evaluation: the runner that scores a system on helpful / harmless / honest (`evaluate`), the pure metrics
(`metrics`) and the judges with their measured validity (`judges`)."""
