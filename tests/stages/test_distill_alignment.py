"""Teacher positions slice back onto the student's response tokens, token by token, for every
privileged-information mode; and the teacher-health checks."""
import math

import pytest
import torch

from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.examples import PromptExample
from opd_megatron.data.privileged import PIConfig
from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.rollout.base import Rollout
from opd_megatron.stages.alignment import gather_positions, response_index
from opd_megatron.stages.distill import (
    check_teacher_health,
    student_microbatches,
    teacher_microbatches,
)
from opd_megatron.stages.rollouts import rollout_batch


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def examples():
    return [
        PromptExample(messages=[{"role": "user", "content": "12+7="}], answer="19",
                      solution="2+7=9, 1+0=1, so 19", system_prompt="Always end with ANSWER: <n>"),
        PromptExample(messages=[{"role": "user", "content": "3+4="}], answer="7",
                      solution="3+4=7, so 7", system_prompt="Always end with ANSWER: <n>"),
    ]


@pytest.mark.parametrize("pi", [None, PIConfig(mode="system_prompt"), PIConfig(mode="answer_only"),
                                PIConfig(mode="full_solution")],
                         ids=["opd", "system_prompt", "answer_only", "full_solution"])
def test_teacher_and_student_align_on_every_response_token(tokenizer, pi):
    exs = examples()
    responses = [tokenizer.encode("2+7=9, so 19\nANSWER: 19") + [tokenizer.eos_token_id],
                 tokenizer.encode("7")]
    rollouts = [Rollout(prompt_index=i, prompt_ids=encode_prompt(tokenizer, ex),
                        response_ids=resp, logprobs=[0.0] * len(resp), finish_reason="stop")
                for i, (ex, resp) in enumerate(zip(exs, responses))]
    batch = rollout_batch(tokenizer, exs, rollouts, micro_batch_size=2)
    (student,) = student_microbatches(batch, 2)
    (teacher,) = teacher_microbatches(tokenizer, pi, batch, 2)
    if pi is not None:  # PI really changes the teacher's prompt
        assert teacher["prompt_len"][0] > student["prompt_len"][0]
    s_index, s_mask = response_index(student["prompt_len"], student["response_len"],
                                     student["labels"].shape[1])
    t_index, t_mask = response_index(teacher["prompt_len"], teacher["response_len"],
                                     teacher["labels"].shape[1])
    assert torch.equal(s_mask, t_mask)
    s_tokens = gather_positions(student["labels"], s_index)
    t_tokens = gather_positions(teacher["labels"], t_index)
    for row, response in enumerate(responses):
        n = len(response)
        assert s_tokens[row, :n].tolist() == response
        assert t_tokens[row, :n].tolist() == response
        assert s_mask[row].sum() == n
    # Logit rows carry the same positions: a fake "logit" equal to the position index.
    positions = torch.arange(teacher["labels"].shape[1]).expand(2, -1)[..., None].float()
    gathered = gather_positions(positions, t_index)[..., 0]
    assert torch.equal(gathered[0, :len(responses[0])],
                       (teacher["prompt_len"][0] - 1 + torch.arange(len(responses[0]))).float())


def test_health_uniform_teacher_is_caught():
    vocab = 110
    lp = torch.full((3, 5), -math.log(vocab))
    assert "uniform teacher" in check_teacher_health(lp, torch.ones(3, 5), vocab)


def test_health_constant_teacher_is_caught():
    lp = torch.full((3, 5), -1.25)
    assert "constant" in check_teacher_health(lp, torch.ones(3, 5), 110)


def test_health_normal_teacher_passes_and_mask_is_respected():
    lp = -torch.rand(3, 5) * 3
    assert check_teacher_health(lp, torch.ones(3, 5), 110) == ""
    constant_where_masked = torch.full((3, 5), -1.0)
    constant_where_masked[0, 0] = -2.0
    mask = torch.zeros(3, 5)
    mask[0, :2] = 1
    assert check_teacher_health(constant_where_masked, mask, 110) == ""
