"""Hooks around the training loop, one concern each (``base.py`` says when each is called):
a new concern is a new file here and a line in ``engine/build.py``; the loop does not change."""
from .base import Check, Hook, HookList, PerRank
from .checkpoint import CheckpointHook
from .ema import EmaHook
from .evaluation import EvalHook
from .membership import MembershipHook
from .metrics import MetricsHook
from .progress import ProgressBarHook
from .prometheus import PrometheusHook
from .quarantine import QuarantineHook
from .run_dir import RunDirHook
from .step_times import StepTimesHook
from .stop import REQUEUE_MARKER, StopHook
from .summary import SummaryHook
from .watchdog import WatchdogHook

__all__ = ["Check", "Hook", "HookList", "PerRank", "CheckpointHook", "EmaHook", "EvalHook",
           "MembershipHook", "MetricsHook", "ProgressBarHook", "PrometheusHook", "QuarantineHook",
           "RunDirHook", "StepTimesHook", "REQUEUE_MARKER", "StopHook", "SummaryHook",
           "WatchdogHook"]
