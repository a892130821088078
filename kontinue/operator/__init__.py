"""The kopf operator that runs TrainingRuns as trainer pods and resumes them after preemption."""
