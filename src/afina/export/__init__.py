"""Export a tuned model for deployment, and prove the export answers as the tuned model does.

    result = export_model("tickets:production", "gguf", quant="q8_0")

The steps, each in its own module: find the run (`source`), fold the adapter into the base
(`merged`), write a Hugging Face directory (`hf_dir`) or a GGUF file with an Ollama Modelfile
(`gguf_file`, `ollama`), describe it (`card`), and load it back in its target runtime to compare its
greedy answers with the tuned model's (`roundtrip`). `export` runs them in that order.
"""
