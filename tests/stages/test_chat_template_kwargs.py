"""`data.chat_template_kwargs` reaches every prompt the run renders, the student's and the
teacher's (with privileged information) alike: Qwen3's non-thinking mode."""
import json
from pathlib import Path

from opd_megatron.config.loader import load_config
from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.examples import PromptExample
from opd_megatron.data.privileged import PIConfig
from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
from opd_megatron.rollout.base import Rollout
from opd_megatron.stages.config import StageConfig
from opd_megatron.stages.context import stage_tokenizer
from opd_megatron.stages.distill import teacher_microbatches
from opd_megatron.stages.rollouts import rollout_batch

CONF = Path(__file__).resolve().parents[2] / "conf"
# Qwen3's template closes an empty think block when thinking is off (the gist of it).
NO_THINK = "<think>\n\n</think>\n\n"


def thinking_tokenizer(directory: Path) -> Path:
    build_tiny_tokenizer(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = config.get("chat_template") or (directory / "chat_template.jinja").read_text()
    template += ("{% if add_generation_prompt and enable_thinking is defined and "
                 "enable_thinking is false %}{{ '" + NO_THINK.replace("\n", "\\n") + "' }}{% endif %}")
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return directory


def test_non_thinking_mode_reaches_student_and_teacher_prompts(tmp_path):
    tok_dir = thinking_tokenizer(tmp_path / "tok")
    cfg = load_config(CONF / "opd_qwen3_1p7b_from_qwen3_1p7b_grpo_tp1_dp8.yaml", StageConfig,
                      [f"data.tokenizer={tok_dir}"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    tokenizer, directory = stage_tokenizer(cfg)
    assert directory == str(tok_dir)
    example = PromptExample(messages=[{"role": "user", "content": "1+1="}], answer="2",
                            system_prompt="Answer with a number.")
    student = encode_prompt(tokenizer, example)
    assert tokenizer.decode(student).endswith("assistant\n" + NO_THINK)
    rollout = Rollout(prompt_index=0, prompt_ids=student, response_ids=tokenizer.encode("2"),
                      logprobs=[-0.1], finish_reason="stop")
    batch = rollout_batch(tokenizer, [example], [rollout], micro_batch_size=1)
    (teacher,) = teacher_microbatches(tokenizer, PIConfig(mode="system_prompt"), batch, 1)
    prompt_len = int(teacher["prompt_len"][0])
    teacher_prompt = tokenizer.decode(teacher["input_ids"][0, :prompt_len].tolist())
    assert "Answer with a number." in teacher_prompt            # the privileged information
    assert teacher_prompt.endswith("assistant\n" + NO_THINK)

    thinking, _ = stage_tokenizer(load_config(
        CONF / "opd_tiny_cpu_tp1.yaml", StageConfig, [f"data.tokenizer={tok_dir}"]))
    assert NO_THINK not in thinking.decode(encode_prompt(thinking, example))
