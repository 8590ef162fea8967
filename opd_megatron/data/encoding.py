"""Examples to token ids: student and teacher prompts, and SFT sequences with their loss mask."""
from __future__ import annotations

from opd_megatron.data.examples import PromptExample, SFTExample
from opd_megatron.data.privileged import PIConfig, teacher_messages
from opd_megatron.data.tokenizer import Tokenizer


def encode_prompt(tok: Tokenizer, example: PromptExample, pi: PIConfig | None = None) -> list[int]:
    """The chat-templated prompt, ending with the assistant generation prompt.

    `pi=None` gives the student prompt; a PIConfig gives the teacher prompt with privileged info.
    """
    messages = example.messages if pi is None else teacher_messages(example, pi)
    return tok.apply_chat_template(messages, add_generation_prompt=True)


def encode_sft(tok: Tokenizer, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask): loss_mask[i] = 1 where input_ids[i] is a response token or the eos.

    The response is encoded after the templated prompt, not inside it, so the ids are exactly what
    the policy would produce when sampling from that prompt.
    """
    prompt = tok.apply_chat_template(example.messages, add_generation_prompt=True)
    response = tok.encode(example.response) + [tok.eos_token_id]
    return prompt + response, [0] * len(prompt) + [1] * len(response)
