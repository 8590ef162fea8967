"""Reward plug-ins for the worker-pool tests: one hangs on demand, one raises on demand."""
import time

from opd_megatron.rewards.registry import register_reward


@register_reward("hangs_on_request")
def hangs_on_request(response, example):
    if response == "hang":
        while True:           # a verifier stuck in a loop (math-verify on adversarial input)
            time.sleep(0.05)
    if response == "raise":
        raise ValueError("cannot parse")
    return 1.0
