"""GGUF export of each architecture afina writes (Llama, Mistral, Qwen2): a tiny random model of each,
with a tokenizer split the way its family splits text, is written to GGUF, loaded in llama.cpp and
answers with the same greedy tokens as transformers; llama.cpp tokenizes every prompt as the
Hugging Face tokenizer does; and the file loads back as an afina `model:`.

Every model gets random q/k/v biases where its attention has them (Qwen2; a Llama with
`attention_bias`), so that a bias written in the wrong layout or not at all changes the answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from afina.errors import AfinaError
from tests.conftest import CHATML, CORPUS

pytest.importorskip("llama_cpp", reason="llama-cpp-python (dev extra) runs the GGUF round trip")

SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True, "initializer_range": 0.2}
PROMPTS = [[{"role": "user", "content": "ticket 12345: the printer isn't working, it's jammed"}],
           [{"role": "system", "content": "classify"}, {"role": "user", "content": "la impresora no imprime 2024"}],
           [{"role": "user", "content": "a vpn não conecta  desde   ontem!!"}]]


def byte_level_tokenizer(directory: Path, split: str | None):
    """A byte-level BPE tokenizer with ChatML, pre-tokenized GPT-2's way (`split` None) or by `split`
    then bytes (Llama 3, Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return fast


def tiny_model(directory: Path, architecture: str) -> Path:
    """A 2-layer random model of `architecture` with its family's tokenizer, saved to `directory`."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from afina.export.gguf_file import LLAMA3_SPLIT, QWEN2_SPLIT

    config_class, model_class, split, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, LLAMA3_SPLIT, {"attention_bias": True}),
        "mistral": (MistralConfig, MistralForCausalLM, None, {"sliding_window": 512}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, QWEN2_SPLIT, {}),
    }[architecture]
    tokenizer = byte_level_tokenizer(directory, split)
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **SIZES, **extra)
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def architecture_dir(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, tiny_model(tmp_path_factory.mktemp(request.param), request.param)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/training/conftest.py


def test_each_architecture_answers_in_llama_cpp_as_in_transformers(architecture_dir, tmp_path):
    """f32: every token identical; f16: identical, but where transformers' two best tokens were
    within rounding (a near tie of the random model). The round trip also checks that llama.cpp
    tokenizes each prompt as the Hugging Face tokenizer does and renders the same chat template."""
    from afina.export.gguf_file import ARCHITECTURES, check_gguf_file, write_gguf
    from afina.export.roundtrip import tuned_answers
    from afina.models.loading import load_model, load_tokenizer, read_gguf_metadata

    name, directory = architecture_dir
    model, tokenizer = load_model(str(directory)), load_tokenizer(str(directory))
    assert name != "qwen2" or model.model.layers[0].self_attn.q_proj.bias is not None
    reference = tuned_answers(model, tokenizer, PROMPTS, 12)
    assert len({a.tokens for a in reference}) == len(PROMPTS)  # the random model does not answer alike
    for quant in ("f32", "f16"):
        path = write_gguf(model, tokenizer, tmp_path / f"{name}-{quant}.gguf", quant)
        assert read_gguf_metadata(path)["general.architecture"] == ARCHITECTURES[name]
        check = check_gguf_file(path, reference, PROMPTS, 12, tokenizer.eos_token_id, tokenizer)
        assert (check.answers, check.identical) == (len(PROMPTS), len(PROMPTS)), (quant, check.first_difference)
        assert quant != "f32" or check.near_ties == 0


def test_a_model_without_its_biases_answers_differently(architecture_dir, tmp_path):
    """The biases matter to these models: zeroed, llama.cpp's answers depart, so the test above
    would catch a writer that dropped them."""
    from afina.export.gguf_file import check_gguf_file, write_gguf
    from afina.export.roundtrip import tuned_answers
    from afina.models.loading import load_model, load_tokenizer

    name, directory = architecture_dir
    model, tokenizer = load_model(str(directory)), load_tokenizer(str(directory))
    if not any(n.endswith("bias") for n, _ in model.named_parameters()):
        pytest.skip(f"{name} has no attention biases")
    reference = tuned_answers(model, tokenizer, PROMPTS, 12)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.zero_()
    path = write_gguf(model, tokenizer, tmp_path / "no-bias.gguf", "f32")
    check = check_gguf_file(path, reference, PROMPTS, 12, tokenizer.eos_token_id, tokenizer)
    assert check.identical < check.answers


def test_each_architectures_gguf_loads_back_as_a_model(architecture_dir, tmp_path, request):
    from afina.export.gguf_file import write_gguf
    from afina.models.loading import load_model, load_tokenizer

    name, directory = architecture_dir
    if name == "llama":  # the fixture's Llama has attention biases, which llama.cpp reads
        request.applymarker(pytest.mark.xfail(reason="transformers' GGUF loader drops a Llama's attention biases",
                                              strict=True))
    model, tokenizer = load_model(str(directory)), load_tokenizer(str(directory))
    path = write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "f32")
    ids = tokenizer("ticket 12345: the printer isn't working", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path))(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused():
    from afina.export.gguf_file import QWEN2_SPLIT, pre_tokenizer_name

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split, byte_level]}) == "qwen2"
    for changed in ({"pattern": {"Regex": QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}+|")}}, {"behavior": "Removed"}):
        with pytest.raises(AfinaError) as caught:
            pre_tokenizer_name({"type": "Sequence", "pretokenizers": [split | changed, byte_level]})
        assert caught.value.code == "export_unsupported" and caught.value.location == "tokenizer"


def test_an_architecture_without_a_gguf_writer_is_refused_naming_those_with_one(tmp_path):
    from transformers import GPT2Config

    from afina.export.gguf_file import check_architecture

    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(AfinaError) as caught:
        check_architecture(str(tmp_path))
    assert caught.value.code == "export_unsupported" and caught.value.location == "model"
    assert all(name in caught.value.message for name in ("llama", "mistral", "qwen2", "gpt2"))
    assert "--format safetensors" in caught.value.hint
