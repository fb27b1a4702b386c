"""An Ollama Modelfile beside the GGUF: the chat template in Ollama's Go template language, the stop
token, and greedy decoding as in afina's evaluation."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def render_modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`ollama create NAME -f Modelfile` in the export folder. Ollama (0.3 and later) reads the chat
    template from the GGUF itself; TEMPLATE is written for ChatML models, whose template Ollama would
    otherwise have to guess."""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in (tokenizer.chat_template or ""):
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
        system = default_system_prompt(tokenizer)
        if system:  # the template's own system message when the conversation has none
            lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{tokenizer.eos_token}"', "PARAMETER temperature 0", "PARAMETER top_k 1",
              "PARAMETER repeat_penalty 1", ""]
    return "\n".join(lines)


def default_system_prompt(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The system message a ChatML template adds to a conversation that has none (SmolLM2 does)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    head = "<|im_start|>system\n"
    if not rendered.startswith(head) or "<|im_end|>" not in rendered:
        return None
    return rendered[len(head):rendered.index("<|im_end|>")]
