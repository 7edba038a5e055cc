"""How a variant's attempt ended. One word for it everywhere: `TrainResult.status` (complete or
diverged), the Optuna trial's `status` attribute, the MLflow run's `state` tag, and the report's counts."""

COMPLETE = "complete"  # trained every epoch; its final metrics are logged
DIVERGED = "diverged"  # NaN/∞, log p above a bounded family's supremum, or a collapsed learned scale
PRUNED = "pruned"  # stopped early by the pruner
FAILED = "failed"  # raised an exception; the study goes on
KILLED = "killed"  # its worker died (SIGKILL, lost machine); found and marked by a later command
INTERRUPTED = "interrupted"  # Ctrl-C
CUT_SHORT = (FAILED, KILLED, INTERRUPTED)  # the next run of the study trains the variant again
SETTLED = (COMPLETE, DIVERGED, PRUNED)  # finished for good: never trained again
FINISHED = (COMPLETE, DIVERGED, PRUNED, *CUT_SHORT)  # every state but running
MLFLOW_STATUS = {COMPLETE: "FINISHED", PRUNED: "KILLED", INTERRUPTED: "KILLED"}  # the others end FAILED
