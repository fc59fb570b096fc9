"""Evaluation: the pairwise arena (contestants, judges, both orders, honest statistics) and benchmark runners.

Pipeline: prompts -> answers (clients) -> judgments in both orders (judge) -> analysis (stats) -> report.
Every call goes through the content-hash cache, so re-runs and crashed runs only fill the gaps.
"""

from qwen35.eval.specs import Completion, ModelSpec, parse_spec

__all__ = ["Completion", "ModelSpec", "parse_spec"]
