"""A reward plug-in that fails on purpose (imported through grpo.reward_plugins)."""
from opd_megatron.rewards.registry import register_reward


@register_reward("always_raises")
def always_raises(response, example):
    raise ZeroDivisionError("this reward always fails")
