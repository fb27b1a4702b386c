"""The `afina` command.

    afina demo                          # the whole path on the bundled model and data
    afina data inspect data.jsonl       # check a data file before spending compute
    afina run config.yaml key=value     # validate, train, compare with the base, keep or discard, register
    afina train config.yaml key=value   # fine-tune
    afina eval RUN                      # tuned vs base on the run's test split
    afina merge RUN                     # fold the adapter into its base
    afina export RUN|MODEL --format gguf --quant q8_0   # merged safetensors or GGUF, checked by a round trip
    afina estimate config.yaml          # tokens, steps, peak memory, time and cost before launch
    afina models list | runs list       # the registry and the record of attempts
    afina serve demo:production         # an OpenAI-compatible server for the base and tuned models
    afina audit verify                  # the audit trail's hash chain
    afina server --workers 1            # the OpenAI-compatible fine-tuning API (files, jobs) with a local worker
    afina worker                        # run queued fine-tuning jobs; start one per GPU machine
    afina keys create NAME | list | revoke NAME   # API keys of the fine-tuning API
    afina users add NAME --role admin | grant | list | remove   # users and their roles in projects
"""

from __future__ import annotations

import typer

from afina.cli import data, demo, estimate, eval, export, keys, merge, registry, run, serve, server, train, users
from afina.cli.console import user_errors

app = typer.Typer(help="Fine-tune open language models on your own data and prove they got better.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(data.app, name="data")
app.command("train")(user_errors(train.train_command))
app.command("eval")(user_errors(eval.eval_command))
app.command("demo")(user_errors(demo.demo_command))
app.command("merge")(user_errors(merge.merge_command))
app.command("export")(user_errors(export.export_command))
app.command("estimate")(user_errors(estimate.estimate_command))
app.command("run")(user_errors(run.run_command))
app.add_typer(registry.models_app, name="models")
app.add_typer(registry.runs_app, name="runs")
app.add_typer(registry.audit_app, name="audit")
app.command("serve")(user_errors(serve.serve_command))
app.add_typer(keys.keys_app, name="keys")
app.add_typer(users.users_app, name="users")
app.command("server")(user_errors(server.server_command))
app.command("worker")(user_errors(server.worker_command))


@app.callback()
def hand_down_encryption() -> None:
    # Every command: the lower layers it drives (models, training) keep files encrypted at rest through
    # what the CLI hands them (`afina.sealing`); torchrun's processes run this command too.
    from afina.security.encryption import use_encryption

    use_encryption()
