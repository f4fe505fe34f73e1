"""The lmms-eval bridge: score an in-memory model on the built-in benchmark and lmms-eval tasks.

``evaluate(model, processor, ["exist", "count", "pope"], bench_dir=BENCH)`` returns an
:class:`EvalResult` (score per task in [0, 100], their mean, versions); ``retention(pruned, dense)``
gives pruned / dense per task and the mean over tasks, as in the paper. lmms-eval (pinned to
0.7.3) is needed only when evaluating; the lmms-eval model class is
``atv_prune.eval.model.InMemoryVLM``.
"""

from .env import LMMS_EVAL_VERSION
from .run import EvalResult, evaluate, retention
from .tasks import write_builtin_tasks

__all__ = ["LMMS_EVAL_VERSION", "EvalResult", "evaluate", "retention", "write_builtin_tasks"]
