"""The fine-tuning service's work: uploaded files, jobs turned into run configs, workers, API keys.

    afina server --workers 1        # the OpenAI-compatible jobs API, with one local worker
    afina worker                    # more workers, on this or other machines sharing the store

A job is queued in the store (`afina.store.jobs`); a worker claims it, builds a run config from it
(`afina.jobs.run_config`) and runs afina's workflow on it, reporting each stage as a job event.
"""
