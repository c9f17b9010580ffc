"""The RQ queue names, in one place: the server (for /metrics), the worker and `preannotate` read them."""

TRAINING_QUEUE = "axx-training"
PREANNOTATE_QUEUE = "axx-preannotate"
QUEUES = (TRAINING_QUEUE, PREANNOTATE_QUEUE)  # a worker's default order: training first
